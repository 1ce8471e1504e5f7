"""servesim: a discrete-event simulator of LLM serving engines' scheduling."""

from .config import Scenario, ScenarioError, load_scenario, scenario_from_dict
from .runner import SimResult, simulate

__version__ = "0.1.0"

__all__ = ["Scenario", "ScenarioError", "SimResult", "load_scenario", "scenario_from_dict", "simulate"]
