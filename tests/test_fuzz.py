"""Fuzzing: random scenario values, wrong types, out-of-range numbers, broken trace files, include
cycles and missing includes. Each case ends, within 60 s, with a report or an error that says what
is wrong, never a traceback (tests/fuzz_scenarios.py runs thousands of the same cases as a script)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_scenarios import FILES, KEYS, TRACE_SUFFIXES, TRACES, VALUES, BASE, mutated, run_case

_change = st.sampled_from(list(KEYS)).flatmap(
    lambda section: st.tuples(st.just(section), st.sampled_from(KEYS[section]), st.sampled_from(VALUES)))
_deleted = st.none() | st.sampled_from([(s, k) for s, keys in BASE.items() for k in keys])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.lists(_change, min_size=1, max_size=3), deleted=_deleted)
def test_random_values_end_in_a_report_or_an_error_naming_the_field(changes, deleted):
    out = run_case(mutated(changes, deleted))
    if out != "report":
        named = [f"{s}.{k}" for s, k, _ in changes] + [s for s, _, _ in changes] + [k for _, k, _ in changes]
        # the message points at what was changed (or at the rule that the change broke)
        assert any(n in out for n in named) or "step_time" in out or "scenario" in out, (changes, out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.sampled_from(TRACES) | st.text(max_size=200), suffix=st.sampled_from(TRACE_SUFFIXES))
def test_broken_trace_files_get_an_error_naming_the_file(content, suffix):
    out = run_case(trace=(content, suffix))
    assert out == "report" or "trace" in out, out


def test_scenario_files_that_cannot_be_read():
    outs = {case: run_case(file_case=case) for case in FILES}
    assert "not a text file" in outs["binary"] and "case.toml" in outs["binary"]
    assert "includes itself" in outs["self_include"]
    assert "scenario file not found" in outs["missing_include"] and "missing.toml" in outs["missing_include"]
    assert "include must be a file name" in outs["include_not_a_name"]


def test_a_run_too_large_for_memory_is_refused_up_front():
    out = run_case(mutated([("workload", "num_prompts", 10**9)]))
    assert out.startswith("error: workload.num_prompts: 1,000,000,000 requests need about")
    out = run_case(mutated([("deployment", "instances", 10**9)]))
    assert out.startswith("error: deployment.instances:")
