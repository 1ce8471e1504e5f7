"""servesim: a discrete-event simulator of LLM serving engines' scheduling."""

__version__ = "0.1.0"

__all__ = ["Scenario", "ScenarioError", "SimResult", "load_scenario", "scenario_from_dict", "simulate"]
_FROM = {"Scenario": "config", "ScenarioError": "config", "load_scenario": "config", "scenario_from_dict": "config",
         "SimResult": "runner", "simulate": "runner"}


def __getattr__(name: str):
    """`from sim import simulate` imports the simulator then, not when any sim module is loaded
    (the CLI's `--help` and the simulator's own submodules need none of it)."""
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
