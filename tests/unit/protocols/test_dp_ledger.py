"""A site's DP ledger: persisted across instances (and processes), refuses a release beyond the budget
without recording it, and keys the total by a fingerprint of the data."""

import json
import multiprocessing

import pytest

from fedprune.protocols.dp_ledger import BudgetError, DPLedger, Spent, data_fingerprint


def _works(folder, **texts):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_charges_persist_across_instances(tmp_path):
    path = tmp_path / "state" / "ledger.json"
    assert DPLedger(path).spent("abc") == Spent() and not path.exists()
    assert DPLedger(path).charge("abc", 0.25, None) == Spent(0.25, 1)
    assert DPLedger(path).charge("abc", 0.5, None) == Spent(0.75, 2)  # a fresh instance reads the file
    assert DPLedger(path).spent("abc") == Spent(0.75, 2) and DPLedger(path).spent("other") == Spent()
    stored = json.loads(path.read_text())
    assert stored == {"version": 1, "data": {"abc": {"rho": 0.75, "releases": 2}}}
    assert not list(path.parent.glob("*.tmp"))  # written atomically: no leftovers


def test_a_release_beyond_the_budget_is_refused_and_not_recorded(tmp_path):
    ledger = DPLedger(tmp_path / "ledger.json")
    ledger.charge("abc", 0.6, budget=1.0)
    with pytest.raises(BudgetError, match=r"budget rho 1 .*dp-budget-rho"):
        ledger.charge("abc", 0.5, budget=1.0)
    assert ledger.spent("abc") == Spent(0.6, 1)
    assert ledger.charge("abc", 0.4, budget=1.0) == Spent(1.0, 2)  # exactly the budget is fine
    assert ledger.charge("xyz", 0.9, budget=1.0).rho == 0.9  # other data has its own total
    with pytest.raises(ValueError, match="finite"):
        ledger.charge("abc", float("nan"), budget=None)


def _charge(path):
    DPLedger(path).charge("shared", 0.001, None)


def test_concurrent_processes_add_up(tmp_path):
    path = tmp_path / "ledger.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_charge, args=(path,)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert DPLedger(path).spent("shared").releases == 8


def test_fingerprint_differs_for_different_data_and_not_for_a_copy(tmp_path):
    a = data_fingerprint(_works(tmp_path / "a", one="to be or not", two="that is"))
    assert a == data_fingerprint(_works(tmp_path / "copy", one="to be or not", two="that is"))
    assert a != data_fingerprint(_works(tmp_path / "b", one="to be or not", two="that was"))
    assert a != data_fingerprint(_works(tmp_path / "c", one="to be or not", three="that is"))
    assert a != data_fingerprint(_works(tmp_path / "d", one="to be or not"))
    edited = _works(tmp_path / "e", one="to be or not", two="that is")
    before = data_fingerprint(edited)
    (edited / "two.txt").write_text("that is the question")  # a site's data changed in place
    assert data_fingerprint(edited) != before
    with pytest.raises(ValueError, match="no .txt works"):
        data_fingerprint(_works(tmp_path / "empty"))
