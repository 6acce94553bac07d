"""The trainers on 2 processes (gloo, CPU) against 1 process: DDP and FSDP2 (fastrlhf.algos.engine).

One ``torchrun --nproc_per_node 2 tests/distributed_worker.py`` runs every 2-process scenario
(about 20 s); the one-process references run here, in the test process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf import cli

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
TIMING = ("tokens_per_s", "step_time_s", "peak_mem_mb")
# DeepSpeed runs where it is installed (.ci/run installs it: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)
needs_ds = pytest.mark.skipif(not worker.HAS_DEEPSPEED, reason="deepspeed is not installed")
DS = pytest.param("deepspeed", marks=needs_ds)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The worker's outputs: ``(out_dir, [rank0 results, rank1 results])``."""
    out = tmp_path_factory.mktemp("two")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HERE / "distributed_worker.py"), str(out)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=HERE.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return out, [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One-process CLI runs of dpo and rm with the same arguments; the rows of each step."""
    from fastrlhf.algos.dpo import DPO
    from fastrlhf.algos.reward import RewardModel

    out = tmp_path_factory.mktemp("one")
    rows = {}
    for algo, cls in (("dpo", DPO), ("rm", RewardModel)):
        orig = cls.train_step

        def spy(self, batch, orig=orig, algo=algo):
            rows.setdefault(algo, []).append([json.dumps(r, sort_keys=True) for r in batch])
            return orig(self, batch)

        cls.train_step = spy
        try:
            worker.cli_run(str(out / algo), algo, *worker.CLI_COMMON)
        finally:
            cls.train_step = orig
        worker.cli_run(str(out / f"{algo}-lora"), algo, *worker.CLI_COMMON, *worker.LORA)
    return out, rows


def weights(run: Path):
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors"), load_file(run / "init" / "model.safetensors")


def metrics(run: Path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo, kind", [("dpo", "ddp"), ("dpo", "fsdp2"), ("rm", "ddp"), ("rm", "fsdp2"),
                                       ("dpo", "fsdp2-offload"), pytest.param("dpo", "deepspeed", marks=needs_ds),
                                       pytest.param("rm", "deepspeed", marks=needs_ds),
                                       pytest.param("dpo", "deepspeed-offload", marks=needs_ds)])
def test_two_processes_end_with_the_one_process_weights(two, one, algo, kind):
    (out2, res), (out1, rows1) = two, one
    w1, init = weights(out1 / algo)
    w2, _ = weights(out2 / f"{algo}-{kind}")
    assert w1.keys() == w2.keys()
    for k in w1:
        rel = float((w2[k] - w1[k]).norm() / w1[k].norm())
        assert rel <= 1e-5, (k, rel)
    # the updates themselves agree (a run that did not train would pass the check above only if lr were tiny)
    shared = [k for k in w1 if k in init]
    upd1 = torch.cat([(w1[k] - init[k]).flatten() for k in shared])
    upd2 = torch.cat([(w2[k] - init[k]).flatten() for k in shared])
    assert float(upd1.norm() / torch.cat([init[k].flatten() for k in shared]).norm()) > 1e-3
    assert float((upd2 - upd1).norm() / upd1.norm()) < 1e-3
    # each rank trained on a different half of each global batch; together they are the one-process batch
    seen = [r["rows"][f"{algo}-{kind}"] for r in res]
    assert len(seen[0]) == len(seen[1]) == len(rows1[algo]) == 2
    for step, global_rows in enumerate(rows1[algo]):
        a, b = seen[0][step], seen[1][step]
        assert len(a) == len(b) == len(global_rows) // 2
        assert a + b == global_rows and a != b
    # rank 0 alone wrote: one metrics line per step, one run directory
    assert [m["step"] for m in metrics(out2 / f"{algo}-{kind}")] == [1, 2]
    assert (out2 / f"{algo}-{kind}" / "summary.json").exists()


@pytest.mark.parametrize("kind", ["fsdp2", DS])
@pytest.mark.parametrize("algo, file", [("dpo", "adapter_model.safetensors"), ("rm", "model.safetensors")])
def test_lora_on_sharded_engines_exports_the_one_process_weights(two, one, algo, file, kind):
    """LoRA under FSDP2 / ZeRO-3: rank 0's adapter initialisation on every shard, and the export from the
    gathered state (the policy's adapters; the reward model merged into a plain checkpoint)."""
    from safetensors.torch import load_file

    (out2, _), (out1, _) = two, one
    w1 = load_file(out1 / f"{algo}-lora" / "final" / file)
    w2 = load_file(out2 / f"{algo}-lora-{kind}" / "final" / file)
    assert w1.keys() == w2.keys() and len(w1) > 0
    if algo == "dpo":
        assert all("lora_" in k for k in w1)
    else:
        assert not any("lora_" in k for k in w1)  # merged
    # merged weights: Adam's first steps turn the reduction-order noise of near-zero adapter gradients into
    # updates of up to ~1e-3 of a small adapter delta (layer 0's k_proj: 0.02 against a weight of norm 1.3), so
    # the merged check is 1e-4 of the weight; a lost or unmerged adapter is off by ~1e-2
    tol = 1e-5 if algo == "dpo" else 1e-4
    for k in w1:
        assert float((w2[k] - w1[k]).norm()) <= tol * float(w1[k].norm()) + 1e-7, k
    assert [m["step"] for m in metrics(out2 / f"{algo}-lora-{kind}")] == [1, 2]


def test_ppo_on_fsdp2_exports_the_policy(two):
    out, _ = two
    final, init = weights(out / "ppo-fsdp2")
    assert final.keys() == init.keys()  # the policy's own keys: no critic, no wrapper prefix
    assert any(not torch.equal(final[k], init[k]) for k in final)
    assert [m["step"] for m in metrics(out / "ppo-fsdp2")] == [1]
    assert metrics(out / "ppo-fsdp2")[0]["vf_loss"] > 0 and metrics(out / "ppo-fsdp2")[0]["grad_norm"] > 0


@pytest.mark.parametrize("kind", ["fsdp2", DS])
def test_resume_is_bit_for_bit(two, kind):
    out, _ = two
    suffix, sub = ("", "dcp") if kind == "fsdp2" else ("-deepspeed", "deepspeed")
    full, resumed = out / f"grpo-full{suffix}", out / f"grpo-resumed{suffix}"
    assert (resumed / "checkpoint-4" / sub).is_dir()
    assert {p.name for p in (resumed / "checkpoint-4").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert json.loads((resumed / "summary.json").read_text())["steps_this_run"] == 2  # resumed at step 2
    a, b = weights(full)[0], weights(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(full) == metrics(resumed)
    assert [m["step"] for m in metrics(resumed)] == [1, 2, 3, 4]


def test_grpo_groups_stay_on_one_rank_and_reward_rises(two):
    _, res = two
    G, steps = 4, len(res[0]["grpo"]["rewards"])
    for step in range(steps):
        local = [r["grpo"]["calls"][step] for r in res]
        for prompts in local:  # each prompt's G completions are scored together, on one rank
            assert len(prompts) == 2 * G
            assert all(len(set(prompts[i : i + G])) == 1 for i in range(0, len(prompts), G))
        assert local[0][::G] + local[1][::G] == res[0]["grpo"]["rows"][step]  # the global batch, split
    assert res[0]["grpo"]["rewards"] == res[1]["grpo"]["rewards"]  # metrics are all-reduced
    rewards = res[0]["grpo"]["rewards"]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", DS])
@pytest.mark.parametrize("algo", worker.NORM_ALGOS)
def test_loss_normaliser_is_the_global_count(two, algo, kind):
    """GRPO's token mean; PPO's policy + value terms (token-mean or sequence-mean policy loss next to the
    token-mean value loss), its KL reward and the advantages whitened over the global rollout; RFT with
    ranks keeping 2 and 1 completions. Each: the gradients of the one-process update."""
    out, _ = two
    ref = worker.normaliser_grads("none", algo)  # one process, the same 4 prompts x 2 completions
    got = torch.load(out / f"grads-{algo}-{kind}.pt")
    assert ref.keys() == got.keys()
    if algo.startswith("ppo"):
        assert any(k.startswith("critic.") for k in ref)
    for k, g in ref.items():
        assert float((got[k] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-8, k
    # rank 0's completions are short, rank 1's long: a per-rank token mean would weigh them differently
    lengths = [sum(map(len, worker.NORM_COMPLETIONS[p])) for p in worker.NORM_PROMPTS]
    assert lengths[0] + lengths[1] < (lengths[2] + lengths[3]) / 3


def test_rft_ranks_keep_different_numbers_of_rows(two):
    _, res = two  # the case above really is uneven: 1 + 2 kept rows, on ddp and on fsdp2
    assert sorted(r["rft_kept"][0] for r in res) == [1, 2]
    assert [r["rft_kept"][0] for r in res] == [r["rft_kept"][1] for r in res]


def test_ddp_all_reduces_once_per_update(two):
    _, res = two
    for r in res:
        updates = r["no_sync"]["updates"]
        assert len(updates) == 1 and updates[0]  # one update of 2 micro-batches
        assert len(updates[0]) == len(set(updates[0]))  # each bucket all-reduced once: no_sync on the first
    assert res[0]["no_sync"]["digest"] == res[1]["no_sync"]["digest"]  # and the ranks stayed in step


def test_linear_op_on_a_sharded_lm_head(two):
    _, res = two
    for r in res:
        assert r["linear"]["error"].startswith("TypeError: weight is a DTensor")
        assert "RootForward" in r["linear"]["error"]
        assert r["linear"]["grad_rel_err"] <= 1e-6  # the op inside the root forward: exact gradients


def test_distributed_none_under_a_launcher_is_refused(monkeypatch):
    from fastrlhf.algos.engine import resolve_engine

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--distributed ddp"):
        resolve_engine("none")
    assert resolve_engine("auto") == "ddp"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_engine("auto") == "none"


def test_deepspeed_config_keeps_the_trainers_batch_and_drops_auto(tmp_path, monkeypatch):
    """An HF / accelerate-style DeepSpeed file: "auto" entries dropped (DeepSpeed rejects them), batch,
    accumulation and clipping the trainer's, an optimizer section refused by name."""
    from fastrlhf.algos.deepspeed_engine import ds_config

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": 8, "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                      "offload_optimizer": {"device": "cpu"}}}))
    cfg = ds_config(str(path), micro_batch_size=4, max_grad_norm=1.0, trainable=True)
    assert cfg == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "bf16": {},
                   "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                   "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
                   "zero_force_ds_cpu_optimizer": False}
    frozen = ds_config(str(path), micro_batch_size=4, max_grad_norm=None, trainable=False)
    assert frozen["zero_optimization"] == {"stage": 3} and frozen["gradient_clipping"] == 0.0
    assert ds_config(None, micro_batch_size=2, max_grad_norm=1.0, trainable=True)["zero_optimization"] == {"stage": 3}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # accelerate's zero_stage, without a file
    assert ds_config(None, micro_batch_size=2, max_grad_norm=1.0, trainable=True)["zero_optimization"] == {"stage": 2}
    path.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="'optimizer'"):
        ds_config(str(path), micro_batch_size=2, max_grad_norm=1.0, trainable=True)


def test_cli_parses_the_engine_flags():
    args = cli.build_parser().parse_args(["train", "dpo", "--distributed", "fsdp2", "--cpu-offload"])
    assert (args.distributed, args.cpu_offload) == ("fsdp2", True)


ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: true
"""


needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="accelerate is not installed")


def accelerate_dpo(config: str, tmp_path: Path, *flags: str) -> Path:
    """``accelerate launch --config_file <config> -m fastrlhf train dpo ...``; the run directory."""
    (tmp_path / "acc.yaml").write_text(config)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "acc.yaml"),
                        "-m", "fastrlhf", "train", "dpo", *worker.CLI_COMMON, *flags,
                        "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600, env=env,
                       cwd=HERE.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return tmp_path / "run"


@needs_accelerate
def test_accelerate_launch_fsdp2_matches_one_process(one, tmp_path):
    """accelerate's launcher (torchrun underneath; MULTI_GPU with use_cpu gives gloo on CPU) runs the same job."""
    out1, _ = one
    run = accelerate_dpo(ACCELERATE_CONFIG, tmp_path, "--distributed", "fsdp2")
    w1, w2 = weights(out1 / "dpo")[0], weights(run)[0]
    assert all(float((w2[k] - w1[k]).norm() / w1[k].norm()) <= 1e-5 for k in w1)
    assert len(metrics(run)) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["engine"], summary["processes"]) == ("fsdp2", 2)


ACCELERATE_DEEPSPEED_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
num_machines: 1
num_processes: 2
mixed_precision: 'no'
"""


@needs_ds
@needs_accelerate
def test_accelerate_launch_with_a_deepspeed_config_matches_one_process(one, tmp_path):
    """accelerate's DEEPSPEED config (ZeRO-3) and no --distributed flag: the engine is DeepSpeed's."""
    out1, _ = one
    run = accelerate_dpo(ACCELERATE_DEEPSPEED_CONFIG, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["engine"], summary["processes"]) == ("deepspeed", 2)
    w1, w2 = weights(out1 / "dpo")[0], weights(run)[0]
    assert all(float((w2[k] - w1[k]).norm() / w1[k].norm()) <= 1e-5 for k in w1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fsdp2", DS])
def test_sharded_engines_on_a_gpu_load_on_the_host(tmp_path, kind):
    """One CUDA process: FSDP2 loads the model into host memory and fully_shard moves its shards to the GPU
    (the path that keeps a large checkpoint off any single GPU); DeepSpeed on CUDA. Weights as without an
    engine (fp32)."""
    import safetensors.torch

    common = [*worker.CLI_COMMON, "--dtype", "float32"]
    worker.cli_run(str(tmp_path / "init-src"), "dpo", *common, "--steps", "0")  # a checkpoint to load as --model
    model = tmp_path / "init-src" / "final"
    one = tmp_path / "one"
    worker.cli_run(str(one), "dpo", *common, "--model", str(model))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    flags = worker.engine_args(kind, str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "-m", "fastrlhf", "train", "dpo", *common, "--model", str(model), *flags,
                        "--output-dir", str(tmp_path / "sharded")], capture_output=True, text=True, timeout=600,
                       env=env, cwd=HERE.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    w1 = safetensors.torch.load_file(one / "final" / "model.safetensors")
    w2 = safetensors.torch.load_file(tmp_path / "sharded" / "final" / "model.safetensors")
    assert all(float((w2[k] - w1[k]).norm() / w1[k].norm()) <= 1e-4 for k in w1)
