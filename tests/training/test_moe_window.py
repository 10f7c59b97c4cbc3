"""The MoE metrics window: what it sums, its state through a checkpoint (JSON), the per-expert
series wandb gets, and the balance alerts (once per onset, after the warm-up)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from deepsuite.config import ConfigError, load_config
from deepsuite.training.metrics import MetricsLogger, expert_series
from deepsuite.training.moe_alerts import BalanceAlerts
from deepsuite.training.moe_stats import MoEStatsTracker, comm_stats, max_vio

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def _feed(tr: MoEStatsTracker, steps: range, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for step in steps:
        for layer, p in ((1, [0.4, 0.3, 0.2, 0.1, 0.0]), (2, [0.2] * 5)):
            tr.update(layer, rng.multinomial(100, p), bias_E=rng.normal(size=5) * step,
                      entropy=float(step) / 3, seq_aux_loss=1 / (step + 7))  # fmt: skip


def test_window_loads_are_the_sum_behind_max_vio_and_dead_experts():
    tr = MoEStatsTracker(5, window=3)
    _feed(tr, range(2))
    assert tr.metrics()["moe/window_steps"] == 2  # fewer than the window early in the run
    _feed(tr, range(2, 7))
    m = tr.metrics()
    assert m["moe/window_steps"] == 3
    for layer in (1, 2):
        w = m[f"moe/layer{layer}/load_window"]
        assert sum(w) == 3 * 100  # tokens x top-k of every step in the window
        assert w == tr.window_counts(layer).tolist()
        assert m[f"moe/layer{layer}/max_vio_global"] == pytest.approx(max_vio(w))
        assert m[f"moe/layer{layer}/dead_experts"] == sum(x == 0 for x in w)
    assert m["moe/layer1/dead_experts"] == 1  # expert 4 of layer 1 never gets a token
    assert tr.steps_without_tokens(1)[4] == 7
    tr.update(1, [0, 0, 0, 0, 5])
    assert tr.steps_without_tokens(1).tolist() == [1, 1, 1, 1, 0]


def test_window_state_through_json_continues_exactly():
    """A tracker restored from its state (as written to trainer_state.json) logs exactly what
    the uninterrupted one logs, now and after more steps."""
    a = MoEStatsTracker(5, window=4)
    _feed(a, range(6))
    b = MoEStatsTracker(5, window=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.metrics() == a.metrics()
    _feed(a, range(6, 9), seed=1)
    _feed(b, range(6, 9), seed=1)
    assert b.metrics() == a.metrics()
    assert (b.steps_without_tokens(1) == a.steps_without_tokens(1)).all()
    shorter = MoEStatsTracker(5, window=2)  # logging.moe_window changed on resume
    shorter.load_state_dict(a.state_dict())
    assert shorter.window_counts(1).tolist() == list(np.sum(list(a._counts[1])[-2:], axis=0))
    with pytest.raises(ValueError, match="moe.n_routed_experts=6"):
        MoEStatsTracker(6).load_state_dict(a.state_dict())


def test_device_tensors_give_the_same_window_and_runs_read_only_when_asked():
    """The trainer hands the tracker device tensors: they (and each expert's run without a
    token) are kept unread until a reader asks, and give what numbers give, through a resume."""
    import torch

    from deepsuite.host_sync import HostSyncCounter

    rng = np.random.default_rng(0)
    loads = [rng.multinomial(60, [0.5, 0.3, 0.2, 0.0, 0.0]) for _ in range(7)]
    loads[4][3] = 1  # expert 3 gets a token once: its run restarts
    ref, dev = MoEStatsTracker(5, window=3), MoEStatsTracker(5, window=3)
    with HostSyncCounter() as reads:
        for c in loads[:5]:
            dev.update(0, torch.tensor(c), torch.tensor(c / 10.0), entropy=torch.tensor(0.5))
    assert reads.count == 0, reads.report()
    for c in loads[:5]:
        ref.update(0, c, c / 10.0, entropy=0.5)
    assert dev.steps_without_tokens(0).tolist() == ref.steps_without_tokens(0).tolist()
    assert dev.steps_without_tokens(0).tolist() == [0, 0, 0, 0, 5]
    resumed = MoEStatsTracker(5, window=3)  # numbers from JSON, then tensors again
    resumed.load_state_dict(json.loads(json.dumps(dev.state_dict())))
    for c in loads[5:]:
        ref.update(0, c, c / 10.0, entropy=0.5)
        dev.update(0, torch.tensor(c), torch.tensor(c / 10.0), entropy=torch.tensor(0.5))
        resumed.update(0, torch.tensor(c), torch.tensor(c / 10.0), entropy=torch.tensor(0.5))
    assert dev.metrics() == ref.metrics() == resumed.metrics()
    assert dev.state_dict() == ref.state_dict() == resumed.state_dict()
    assert ref.steps_without_tokens(0).tolist() == [0, 0, 0, 2, 7]


def test_expert_series_names_values_and_cap():
    tr = MoEStatsTracker(12, window=2)
    tr.update(3, [0] + [10] * 11, bias_E=np.arange(12) / 10)
    tr.update(3, [0] + [20] * 11, bias_E=np.arange(12) / 10)
    m = tr.metrics()
    s = expert_series(m, cap=24)
    assert len(s) == 24
    assert s["moe/layer3/expert/00/load_share"] == 0.0  # dead
    assert s["moe/layer3/expert/11/load_share"] == pytest.approx(30 / (330 / 12))
    assert sum(v for k, v in s.items() if k.endswith("load_share")) == pytest.approx(12)
    assert s["moe/layer3/expert/07/bias"] == pytest.approx(0.7)
    assert all(re.fullmatch(r"moe/layer3/expert/\d\d/(load_share|bias)", k) for k in s)
    assert expert_series(m, cap=23) == {}  # over the cap: none, never some
    assert expert_series({"loss/train": 1.0}, cap=100) == {}
    wide = MoEStatsTracker(128)
    wide.update(1, np.ones(128))
    assert "moe/layer1/expert/007/load_share" in expert_series(wide.metrics(), cap=4096)


def test_comm_stats_per_rank():
    m = comm_stats([100, 300], a2a_bytes=30.0, a2a_time_s=0.2, a2a_bytes_R=[10, 20],
                   a2a_time_R=[0.1, 0.2])  # fmt: skip
    assert m["comm/rank0/a2a_bytes"] == 10 and m["comm/rank1/a2a_time"] == 0.2
    assert m["comm/a2a_bytes"] == 30 and m["comm/straggler"] == 1.5
    with pytest.raises(ValueError, match="a2a_bytes_R must have length 2"):
        comm_stats([1, 2], a2a_bytes_R=[1, 2, 3])


def _alert_run(alerts: BalanceAlerts, loads: list[list[int]], window: int = 2):
    tr = MoEStatsTracker(4, window=window)
    fired = []
    for step, c in enumerate(loads, start=1):
        tr.update(1, c)
        fired += [(a.step, a.kind, a.text) for a in alerts.check(tr, step)]
    return fired


def test_dead_expert_alert_fires_once_per_onset_after_warm_up():
    dead3 = [10, 10, 10, 0]
    loads = [dead3] * 6 + [[10, 10, 10, 1]] + [dead3] * 4
    fired = _alert_run(BalanceAlerts(dead_steps=3, after_steps=4), loads)
    # dead from step 1, 3 steps reached at step 3 but the warm-up runs to step 4; a token at
    # step 7 re-arms it, and it is dead for 3 steps again at step 10
    assert [(s, k) for s, k, _ in fired] == [(5, "dead_experts"), (10, "dead_experts")]
    assert "expert 3 of 4 received no token for 3+ steps" in fired[0][2]
    assert "logging.alert_dead_steps=3" in fired[0][2]
    assert _alert_run(BalanceAlerts(dead_steps=0), loads) == []  # off


def test_dead_expert_rearmed_by_a_token_between_sparse_checks():
    """Checked every 3rd step (logging.log_every=3), a token between checks still re-arms."""
    dead3 = [10, 10, 10, 0]
    loads = [dead3] * 6 + [[10, 10, 10, 1]] + [dead3] * 5
    alerts, tr, fired = BalanceAlerts(dead_steps=3), MoEStatsTracker(4, window=2), []
    for step, c in enumerate(loads, start=1):
        tr.update(1, c)
        if step % 3 == 0:
            fired += [a.step for a in alerts.check(tr, step)]
    assert fired == [3, 12]  # re-armed at step 9 (a run of 2), dead for 5 steps at step 12


def test_max_vio_alert_fires_once_then_rearms_after_a_clean_window():
    hot, fair = [40, 0, 0, 0], [10, 10, 10, 10]
    loads = [hot] * 5 + [fair] * 2 + [hot] + [fair] * 3 + [hot] * 2
    fired = _alert_run(BalanceAlerts(max_vio=1.0, after_steps=1), loads, window=2)
    # window MaxVio: 3 until step 6 (half fair), 0 at step 7, 1.5 at steps 8-9: the alert of
    # step 2 is not re-armed (clean for one step only); clean at 10 and 11 re-arms; 12 fires
    assert [s for s, _, _ in fired] == [2, 12]
    assert "MaxVio over the last 2 steps is 3.00 > logging.alert_max_vio=1" in fired[0][2]
    assert "expert 0 got 4.00x its fair share" in fired[0][2]


def test_alert_state_survives_a_resume():
    loads = [[40, 0, 0, 0]] * 6
    a = BalanceAlerts(dead_steps=2, max_vio=1.0)
    fired = _alert_run(a, loads[:3])
    assert [k for _, k, _ in fired] == ["max_vio", "dead_experts"]  # 3 experts, one alert
    assert "experts 1, 2, 3 of 4" in fired[1][2]
    b = BalanceAlerts(dead_steps=2, max_vio=1.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    tr = MoEStatsTracker(4, window=2)
    for c in loads[:4]:
        tr.update(1, c)
    assert b.check(tr, 4) == []  # the same conditions: no second alert after the resume


def test_bad_alert_arguments_and_config_keys():
    with pytest.raises(ValueError, match="dead_steps"):
        BalanceAlerts(dead_steps=-1)
    with pytest.raises(ValueError, match="max_vio"):
        BalanceAlerts(max_vio=float("nan"))
    for override, key in (
        ("logging.alert_max_vio=-0.5", "logging.alert_max_vio"),
        ("logging.alert_dead_steps=-3", "logging.alert_dead_steps"),
        ("logging.moe_window=0", "logging.moe_window"),
        ("logging.images_every=-1", "logging.images_every"),
        ("logging.expert_series_max=-1", "logging.expert_series_max"),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(TINY, [override])
    cfg = load_config(TINY, ["logging.moe_every=25"])
    assert cfg.logging.moe_window_steps == 25  # never shorter than the logging interval


def test_alert_goes_to_stderr_on_rank0_only(tmp_path, capsys):
    with MetricsLogger(tmp_path / "r1", rank=1, config={}, console=False) as lg:
        lg.alert("t", "rank 1 says nothing")
    out = io.StringIO()
    with MetricsLogger(tmp_path / "r0", rank=0, config={}, stream=out) as lg:
        lg.alert("MoE layer 1: dead expert", "step 5: MoE layer 1: expert 3 ...")
    err = capsys.readouterr().err
    assert "rank 1" not in err
    assert err.count("deepsuite WARNING step 5: MoE layer 1: expert 3 ...") == 1
