"""Bad input through the real entry points ends in a line or two naming it, on every rank.

Each case of ``CASES`` runs a real command in its own process session: ``python train/train.py``
(one process), ``deepsuite torchrun ... train/train.py`` (2 gloo ranks), or a ``deepsuite``
subcommand, and asserts:

- the exit status (2 for bad input; torchrun itself reports 1);
- every fragment of the message (the key or file, what was expected) in the output;
- no "Traceback" anywhere in stdout + stderr (plain torchrun adds its own, checked apart);
- with 2 ranks: each rank printed the message itself, prefixed ``[rank r]``;
- every process of the command has exited (no rank left waiting in a collective);
- ``early`` cases failed before the process group and the data preparation: neither the run
  directory nor the data cache exists afterwards.

The cases of this module's selection run concurrently (``DEEPSUITE_BAD_INPUT_JOBS``, default
the CPU count; 1 measures each case's time to failure alone); under pytest-xdist each runs in
its own test. The wall-clock bound is generous on purpose: a loaded 2-core machine must not
make it flake; a hang still fails it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.distributed.launch import free_port
from tests.training.runner import env as run_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = str(ROOT / "configs/tiny.yaml")
TRAIN = str(ROOT / "train/train.py")
BOUND_S = 300.0  # per case: generous (a loaded machine), but a hang fails
# one process: ep 1; each case writes only under its own run and cache directories
ONE = [
    "parallel.ep=1",
    "train.run_dir={run}",
    "data.cache_dir={cache}",
    "logging.console=false",
    "data.max_documents=200",
    "train.steps=2",
    "train.eval_every=0",
    "train.save_every=0",
]
TWO = [a for a in ONE if a != "parallel.ep=1"]  # tiny.yaml's ep 2 over 2 ranks


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # "train" (python train/train.py), "cli" (deepsuite ...), "ranks2", "torchrun"
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    rc: int = 2
    early: bool = True  # failed before the process group / data preparation
    env: dict[str, str] = field(default_factory=dict)

    def command(self, d: Path) -> list[str]:
        fill = {"d": str(d), "run": str(d / "runs" / self.id), "cache": str(d / "cache" / self.id)}
        argv = list(self.argv)
        for key, value in fill.items():  # not str.format: YAML flow mappings hold braces
            argv = [a.replace("{" + key + "}", value) for a in argv]
        if self.kind == "cli":
            return [str(BIN / "deepsuite"), *argv]
        if self.kind == "train":
            return [sys.executable, TRAIN, *argv]
        port = str(free_port())
        launcher = (
            [str(BIN / "deepsuite"), "torchrun"]
            if self.kind == "ranks2"
            else [str(BIN / "torchrun")]
        )
        return [
            *launcher,
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            TRAIN,
            *argv,
        ]


def train(id_: str, *overrides: str, needles: tuple[str, ...], **kw) -> Case:
    return Case(id_, "train", (TINY, *ONE, *overrides), needles, **kw)


def train_config(id_: str, config: str, needles: tuple[str, ...]) -> Case:
    return Case(id_, "train", (config, *ONE), needles)


def cli(id_: str, *argv: str, needles: tuple[str, ...], rc: int = 2) -> Case:
    return Case(id_, "cli", argv, needles, rc=rc, early=False)


def ranks2(id_: str, *overrides: str, needles: tuple[str, ...], **kw) -> Case:
    return Case(id_, "ranks2", (TINY, *TWO, *overrides), needles, **kw)


# fmt: off
CASES = [
    # ---- the config: overrides and YAML files --------------------------------------------
    train("override-unknown-key", "train.stepz=3", needles=("override", "train.stepz", "steps")),
    train("override-unknown-section", "nosuch.x=1", needles=("nosuch",)),
    train("override-wrong-type", "train.steps=abc", needles=("train.steps", "'abc'")),
    train("override-bad-value", "train.steps=0", needles=("train.steps: expected a positive",)),
    train("override-no-equals", "train.steps", needles=("key.sub=value",)),
    train("override-unparsable", "train.steps=[1", needles=("train.steps=[1", "cannot parse")),
    train_config("config-missing", "{d}/nope.yaml", needles=("nope.yaml", "not found")),
    train_config("config-is-a-directory", "{d}", needles=("a directory",)),
    train_config("yaml-malformed", "{d}/malformed.yaml", needles=("malformed.yaml, line 3",)),
    train_config("yaml-not-a-mapping", "{d}/list.yaml", needles=("list.yaml", "a mapping")),
    train_config("yaml-unknown-key", "{d}/unknown_key.yaml", needles=("unknown_key.yaml", "stepz")),
    train_config("yaml-extends-missing", "{d}/extends_missing.yaml", needles=("no_base.yaml",)),
    train_config("yaml-extends-cycle", "{d}/cycle_a.yaml", needles=("cycle",)),
    train_config("yaml-not-utf8", "{d}/latin1.yaml", needles=("latin1.yaml", "UTF-8")),
    train("moe-score-func", "moe.score_func=relu", needles=("moe.score_func", "sigmoid")),
    train("seq-len-over-model", "data.seq_len=4096", needles=("data.seq_len", "max_seq_len")),
    train("ep-not-dividing-experts", "parallel.ep=3", needles=("parallel.ep", "n_routed_experts")),
    train("ep-over-world", "parallel.ep=2", needles=("parallel.ep", "world size 1")),
    train("batch-not-multiple", "train.global_batch_size=12", needles=("train.global_batch_size",)),
    train("zero-stage-3-override", "parallel.zero_stage=3", needles=("parallel.zero_stage",)),
    train("wandb-mode", "logging.wandb=maybe", needles=("logging.wandb",)),
    train("document-separator", "data.document_separator=para", needles=("data.document_sep",)),
    train("run-dir-is-a-file", "train.run_dir={d}/a.jsonl", needles=("train.run_dir", "a file")),
    # ---- the DeepSpeed JSON --------------------------------------------------------------
    train("json-missing", "parallel.deepspeed_config={d}/nope.json", needles=("nope.json",)),
    train("json-malformed", "parallel.deepspeed_config={d}/mal.json", needles=("mal.json, line 2",)),
    train("json-not-object", "parallel.deepspeed_config={d}/array.json", needles=("JSON object",)),
    # a ZeRO-3 JSON at ep 1 trained and exported every routed expert with shape (0,)
    train("json-zero3-vs-yaml-stage", "parallel.deepspeed_config={d}/z3.json",
          "parallel.zero_stage=2", needles=("z3.json", "contradicts zero_optimization.stage=3")),
    train("json-stage-text", "parallel.deepspeed_config={d}/stage_str.json", needles=("stage",)),
    train("json-optimizer", "parallel.deepspeed_config={d}/opt.json", needles=("optimizer", "optim")),
    train("json-batch-disagrees", "parallel.deepspeed_config={d}/tbs.json",
          needles=("train_batch_size", "train.global_batch_size")),
    train("json-clip-disagrees", "parallel.deepspeed_config={d}/clip.json",
          needles=("gradient_clipping", "optim.grad_clip")),
    train("json-fp16", "parallel.deepspeed_config={d}/fp16.json", needles=("fp16.enabled",)),
    train("json-unknown-zero-key", "parallel.deepspeed_config={d}/unk.json",
          needles=("zero_optimization.reduce_bucket_sizee",)),
    train("json-offload", "parallel.deepspeed_config={d}/offload.json", needles=("offload",)),
    # ---- data: source, field, tokenizer --------------------------------------------------
    train("source-missing", "data.source={d}/nope.jsonl", needles=("data.source", "nope.jsonl")),
    train("source-empty-file", "data.source={d}/empty.jsonl", needles=("data.source", "empty")),
    train("source-glob-empty", "data.source={d}/none/*.jsonl", needles=("no data files",)),
    train("source-mixed-kinds", "data.source={d}/mixed", needles=("data.source", "one of")),
    # a wrong field raised on rank 0 only, after the others had started (see the 2-rank case)
    train("text-field-missing", "data.source={d}/a.jsonl", "data.text_field=content",
          needles=("data.text_field", "'content'", "a.jsonl", "body")),
    train("text-field-not-text", "data.source={d}/n.jsonl", "data.text_field=body",
          needles=("data.text_field", "holds int")),
    train("jsonl-malformed", "data.source={d}/m.jsonl", needles=("cannot read", "m.jsonl")),
    train("parquet-corrupt", "data.source={d}/g.parquet", needles=("cannot read", "g.parquet")),
    train("txt-with-text-field", "data.source={d}/one.txt", "data.text_field=body",
          needles=("data.text_field", "'text'")),
    train("hub-unknown", "data.source=no-user/no-such-data", needles=("data.source", "no-user")),
    train("tokenizer-missing", "data.tokenizer={d}/nope-tok", needles=("data.tokenizer",)),
    train("tokenizer-not-json", "data.tokenizer={d}/a.jsonl", needles=("data.tokenizer", "a.jsonl")),
    train("tokenizer-no-eos", "data.tokenizer={d}/noeos.json", needles=("data.tokenizer", "EOS")),
    train("bpe-vocab-small", "data.tokenizer=bpe", "data.bpe_vocab_size=100", needles=("bpe_voc",)),
    train("vocab-below-tokenizer", "model.vocab_size=100", needles=("model.vocab_size", "257")),
    train("aux-head-unknown-type", "model.aux_heads=[{name: h, modules: [{type: Nope}]}]",
          needles=("model.aux_heads[h].modules[0].type", "Nope")),
    train("aux-head-wrong-width", "model.aux_heads=[{name: h, modules: [{type: Linear, "
          "args: {in_features: '@dim', out_features: 3}}]}]", needles=("model.aux_heads[h]", "@vocab")),
    # found only once the corpus is read: after data preparation, on every rank together
    train("txt-one-document-val", "data.source={d}/one.txt", "data.document_separator=file",
          needles=("data.val_fraction", "1 document", "data.document_separator"), early=False),
    train("val-smaller-than-batch", "data.source={d}/small.jsonl", "data.text_field=body",
          "data.val_fraction=0.05", needles=("fewer than one global batch",), early=False),
    # ---- checkpoints to resume -----------------------------------------------------------
    train("resume-missing", "train.resume={d}/MISSING_DIR", needles=("train.resume", "MISSING_DIR")),
    train("resume-is-a-file", "train.resume={d}/a.jsonl", needles=("train.resume", "is a file")),
    train("resume-empty", "train.resume={d}/empty_ckpt", needles=("no complete checkpoint",)),
    train("resume-tag-dir", "train.resume={d}/tagged/step_00000002",
          needles=("one checkpoint tag", "tagged")),
    train("resume-unfinished", "train.resume={d}/unfinished", needles=("without a finished save",)),
    train("resume-other-model", "train.resume={d}/other_model", needles=("model.dim: 64",)),
    # ---- the launcher's environment ------------------------------------------------------
    train("env-rank-out-of-range", needles=("[rank 3]", "world_size=2"),
          env={"RANK": "3", "WORLD_SIZE": "2"}),
    train("env-world-not-int", needles=("WORLD_SIZE", "'abc'"), env={"RANK": "0", "WORLD_SIZE": "abc"}),
    # ---- the deepsuite subcommands -------------------------------------------------------
    cli("train-missing-config", "train", "{d}/nope.yaml", needles=("deepsuite train", "nope.yaml")),
    cli("params-missing-config", "params", "{d}/nope.yaml", needles=("nope.yaml",)),
    cli("params-bad-override", "params", TINY, "train.stepz=1", needles=("train.stepz",)),
    cli("plan-bad-nodes", "plan", TINY, "--nodes", "0", needles=("nodes",)),
    cli("plan-no-config", "plan", needles=("give a CONFIG",)),
    cli("plan-malformed-yaml", "plan", "{d}/malformed.yaml", needles=("malformed.yaml, line 3",)),
    cli("summary-missing", "summary", "{d}/MISSING", needles=("no metrics file",)),
    cli("plot-missing", "plot", "{d}/MISSING", needles=("no metrics file",)),
    cli("plot-no-moe", "plot", "{d}/run_no_moe", needles=("no moe/layer",)),
    cli("reshard-missing", "reshard", "{d}/MISSING", "{d}/out", "--ep", "2", needles=("src:",)),
    cli("reshard-empty", "reshard", "{d}/empty_ckpt", "{d}/o", "--ep", "2", needles=("no complete",)),
    cli("reshard-bad-ep", "reshard", "{d}/complete", "{d}/o", "--ep", "3", needles=("parallel.ep",)),
    cli("convert-hf-missing", "convert", "to-deepsuite", "{d}/MISSING", "{d}/o",
        needles=("config.json",)),
    cli("convert-no-export", "convert", "to-hf", "{d}/empty_ckpt", "{d}/o",
        needles=("model.safetensors",)),
    cli("unknown-command", "nosuch", needles=("unknown command",)),
    # ---- 2 ranks under torchrun: every rank prints, every rank exits ---------------------
    # a wrong field raised on rank 0 only and rank 1 died in a barrier
    ranks2("text-field-2-ranks", "data.source={d}/a.jsonl", "data.text_field=content",
           needles=("data.text_field", "'content'")),
    # a bad key: the ranks agree on it too (else the fastest exits and torchrun stops the rest)
    ranks2("unknown-key-2-ranks", "train.stepz=3", needles=("train.stepz",)),
    ranks2("json-zero3-hpz-2-ranks", "parallel.deepspeed_config={d}/z3_hpz.json",
           needles=("z3_hpz.json", "zero_hpz_partition_size")),
    ranks2("reduce-scatter-off-ep2", "parallel.deepspeed_config={d}/rs_false.json",
           needles=("zero_optimization.reduce_scatter",)),
    ranks2("ep-not-dividing-world", "parallel.ep=4", needles=("parallel.ep", "world size 2")),
    ranks2("resume-missing-2-ranks", "train.resume={d}/MISSING_DIR", needles=("MISSING_DIR",)),
    ranks2("txt-one-document-2-ranks", "data.source={d}/one.txt", "data.document_separator=file",
           needles=("data.val_fraction", "found by rank 0"), early=False),
    # plain torchrun: the same lines from every rank, then torchrun's own report (exit 1)
    Case("plain-torchrun", "torchrun", (TINY, *TWO, "train.stepz=3"), ("train.stepz",), rc=1),
]
# fmt: on
SLOW = {c.id for c in CASES if c.kind in ("ranks2", "torchrun")}


# ---- the files the cases read ----------------------------------------------------------------
def _make_files(d: Path) -> None:
    from tokenizers import Tokenizer, models

    from deepsuite.checkpoint import layout
    from deepsuite.config import load_config

    def w(name: str, text: str) -> None:
        (d / name).write_text(text)

    w("malformed.yaml", "train:\n  steps: 3\n bad: [\n")
    w("list.yaml", "- 1\n- 2\n")
    w("unknown_key.yaml", f"extends: {TINY}\ntrain:\n  stepz: 3\n")
    w("extends_missing.yaml", "extends: no_base.yaml\n")
    w("cycle_a.yaml", "extends: cycle_b.yaml\n")
    w("cycle_b.yaml", "extends: cycle_a.yaml\n")
    (d / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    jsons = {
        "mal.json": '{"zero_optimization": {"stage": 1},\n "x": }\n',
        "array.json": "[1, 2]",
        "z3.json": {"zero_optimization": {"stage": 3}},
        "z3_hpz.json": {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}},
        "stage_str.json": {"zero_optimization": {"stage": "two"}},
        "opt.json": {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}},
        "tbs.json": {"train_batch_size": 999},
        "clip.json": {"gradient_clipping": 0.3},
        "fp16.json": {"fp16": {"enabled": True}},
        "unk.json": {"zero_optimization": {"stage": 1, "reduce_bucket_sizee": 5}},
        "offload.json": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        "rs_false.json": {"zero_optimization": {"stage": 1, "reduce_scatter": False}},
    }
    for name, body in jsons.items():
        w(name, body if isinstance(body, str) else json.dumps(body))
    w("a.jsonl", '{"body": "hello there"}\n{"body": "more text"}\n')
    w("n.jsonl", '{"body": 3}\n')
    w("m.jsonl", '{"body": "ok"\n')
    w("g.parquet", "garbage")
    w("empty.jsonl", "")
    (d / "mixed").mkdir()
    w("mixed/a.txt", "text\n")
    w("mixed/b.jsonl", '{"text": "x"}\n')
    w("small.jsonl", "".join(json.dumps({"body": f"doc {i} " * 8}) + "\n" for i in range(100)))
    from pydoc_data.topics import topics

    w("one.txt", "\n\n".join(topics[k].strip().replace("\n\n", "\n") for k in sorted(topics)[:8]))
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(d / "noeos.json"))
    (d / "empty_ckpt").mkdir()
    (d / "unfinished" / "step_00000002").mkdir(parents=True)
    tiny = load_config(TINY).to_dict()
    state = {"step": 2, "tokens_seen": 0, "world_size": 1, "train_loader": {}, "config": tiny}
    for name, cfg in (("tagged", tiny), ("complete", tiny), ("other_model", None)):
        if cfg is None:
            cfg = json.loads(json.dumps(tiny))
            cfg["model"]["dim"] = 64
        tag = d / name / "step_00000002"
        tag.mkdir(parents=True)
        layout.write_trainer_state(tag, {**state, "config": cfg})
        layout.commit_latest(d / name, tag.name, keep_last=3)
    (d / "run_no_moe").mkdir()
    w("run_no_moe/metrics.jsonl", '{"step": 1, "time": 0.0, "loss/train": 2.0}\n')


# ---- running a case --------------------------------------------------------------------------
@dataclass
class Result:
    rc: int
    out: str
    seconds: float
    cpu_s: float  # user + system time of the command's processes (exact when JOBS=1)
    left: list[int]  # processes of the command's session still alive after it ended


def _session_members(sid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            alive.append(int(stat.parent.name))
    return alive


def run_case(case: Case, d: Path) -> Result:
    e = run_env()
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a launch of our own
        e.pop(var, None)
    e.update(case.env)
    t0, ru0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(
        case.command(d),
        cwd=ROOT,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        out += f"\n[test] killed after {BOUND_S} s"
    seconds = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = ru.ru_utime - ru0.ru_utime + ru.ru_stime - ru0.ru_stime
    deadline = time.monotonic() + 10  # a launcher's children may take a moment to be reaped
    while (left := _session_members(p.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
    return Result(p.returncode, out, seconds, cpu_s, left)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_inputs")
    _make_files(d)
    return d


@pytest.fixture(scope="module")
def results(request, files) -> Iterator[dict[str, Future]]:
    """Start every selected case of this module at once (a pool of JOBS), unless under xdist,
    where each test runs its own case."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        yield {}
        return
    params = [getattr(item, "callspec", None) for item in request.session.items]
    wanted = [p.params["case"] for p in params if p is not None and "case" in p.params]
    jobs = int(os.environ.get("DEEPSUITE_BAD_INPUT_JOBS", os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        yield {c.id: pool.submit(run_case, c, files) for c in wanted}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in SLOW else []) for c in CASES],
)
def test_bad_input_ends_in_one_clear_line(case: Case, files: Path, results) -> None:
    r = results[case.id].result() if case.id in results else run_case(case, files)
    shown = f"{case.id}: exit {r.rc} after {r.seconds:.1f} s:\n{r.out[-3000:]}"
    if os.environ.get("DEEPSUITE_BAD_INPUT_TIMES"):  # a file to collect the times to failure
        with open(os.environ["DEEPSUITE_BAD_INPUT_TIMES"], "a") as f:
            f.write(
                json.dumps(
                    {
                        "case": case.id,
                        "kind": case.kind,
                        "rc": r.rc,
                        "s": r.seconds,
                        "cpu_s": r.cpu_s,
                    }
                )
                + "\n"
            )
    assert r.rc == case.rc, shown
    for needle in case.needles:
        assert needle in r.out, f"{needle!r} missing; {shown}"
    assert not r.left, f"processes {r.left} still running; {shown}"
    assert r.seconds < BOUND_S, shown
    if case.kind == "torchrun":  # torchrun's own report follows, and names our message
        before, _, report = r.out.partition("Traceback")
        assert "ChildFailedError" in report and "train.stepz" in report, shown
        assert "Traceback" not in report.replace("Traceback (most recent call last)", "", 1)
    else:
        before = r.out
        assert "Traceback" not in r.out, shown
    lines = [ln for ln in before.splitlines() if "error:" in ln]
    if case.kind in ("ranks2", "torchrun"):  # each rank printed the same message itself
        mine = [ln.split("] ", 1)[1] for ln in lines if ln.startswith("[rank ")]
        assert sorted(ln[:7] for ln in lines) == ["[rank 0", "[rank 1"], shown
        assert len(set(mine)) == 1, shown
    else:
        assert lines, shown
    if case.early:  # failed before the process group and the data preparation
        assert not (files / "runs" / case.id).exists(), shown
        assert not (files / "cache" / case.id).exists(), shown


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.slow
def test_deepsuite_torchrun_keeps_the_early_stop_status(files: Path) -> None:
    """Not bad input: a run stopped early on a notice exits 75 on every rank (not requeued
    outside SLURM), and ``deepsuite torchrun`` ends with that status and rank 0's line, not
    torchrun's failure report and exit 1 (scripts/train.sh launches through it)."""
    notice = files / "notice"
    notice.touch()  # as slurm/task.sh keeps a notice heard before the trainer listened
    case = ranks2("stopped-early", needles=(), rc=75, early=False)
    r = run_case(Case(**{**case.__dict__, "env": {"DEEPSUITE_NOTICE": str(notice)}}), files)
    shown = f"exit {r.rc} after {r.seconds:.1f} s:\n{r.out[-3000:]}"
    assert r.rc == 75, shown
    assert "not requeued: rerun the same command to resume" in r.out, shown
    assert "Traceback" not in r.out and "ChildFailedError" not in r.out, shown
    assert not r.left, shown
