"""``fastrlhf train {dpo,grpo,ppo}`` and ``fastrlhf bench`` (CPU, a few steps each)."""

import json
import subprocess
import sys
import types

import pytest
import torch

from fastrlhf import cli
from fastrlhf.algos import build_char_tokenizer, tiny_causal_lm

FAST = ["--steps", "2", "--warmup-steps", "3", "--no-progress"]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("algo", ["grpo", "ppo", "dpo"])
def test_train_embedded_writes_outputs(algo, tmp_path, capsys):
    out = tmp_path / algo
    extra = ["--prompts-per-step", "4", "--micro-batch-size", "4", "--grad-accum", "1"] if algo != "dpo" else \
            ["--micro-batch-size", "4"]
    if algo == "grpo":
        extra += ["--group-size", "2", "--micro-batch-size", "8"]
    assert cli.main(["train", algo, "--output-dir", str(out), *FAST, *extra]) == 0
    printed = capsys.readouterr().out
    assert f"fastrlhf train {algo}: 2 steps" in printed and "->" in printed
    summary = json.loads((out / "summary.json").read_text())
    key = "reward_accuracy" if algo == "dpo" else "reward"
    assert len(summary[key]) == 2 and "eval_accuracy" in summary
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "final" / "config.json").exists() and (out / "checkpoint-2" / "trainer_state.pt").exists()


def test_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    args = ["train", "dpo", "--output-dir", str(out), "--micro-batch-size", "4", "--warmup-steps", "3",
            "--no-progress", "--no-plot"]
    cli.main([*args, "--steps", "2"])
    cli.main(["train", "dpo", "--resume", str(out), "--steps", "4", "--no-progress"])
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    with pytest.raises(ValueError, match="dpo run"):
        cli.main(["train", "grpo", "--resume", str(out), "--no-progress"])
    with pytest.raises(SystemExit, match="already holds a run"):
        cli.main([*args, "--steps", "1"])
    cli.main([*args, "--steps", "1", "--overwrite"])
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == [1]


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """A tiny model + tokenizer saved as a local Hugging Face checkpoint."""
    path = tmp_path_factory.mktemp("ckpt")
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, tokenizer=tok, device="cpu")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_train_local_model_and_jsonl(local_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) for a in range(8)))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a)})
                               for a in range(8)))
    common = ["--model", str(local_checkpoint), "--steps", "1", "--no-progress", "--no-plot"]
    s = cli.train(cli.build_parser().parse_args(
        ["train", "grpo", *common, "--dataset", str(prompts), "--output-dir", str(tmp_path / "g"),
         "--prompts-per-step", "4", "--group-size", "2", "--micro-batch-size", "8", "--grad-accum", "1",
         "--max-new-tokens", "3"]))
    assert s["steps"] == 1 and "eval_accuracy" not in s
    s = cli.train(cli.build_parser().parse_args(
        ["train", "dpo", *common, "--dataset", str(prefs), "--output-dir", str(tmp_path / "d"),
         "--micro-batch-size", "4", "--loss-type", "ipo"]))
    assert s["steps"] == 1
    with pytest.raises(SystemExit, match="reward"):  # prompt-only rows without an answer column
        bare = tmp_path / "bare.jsonl"
        bare.write_text(json.dumps({"prompt": "hi"}))
        cli.main(["train", "grpo", *common, "--dataset", str(bare), "--output-dir", str(tmp_path / "b")])
    with pytest.raises(FileNotFoundError, match="--model"):
        cli.main(["train", "dpo", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "m")])


def test_bench_forwards_argv(monkeypatch):
    seen = {}
    fake = types.ModuleType("fastrlhf.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fastrlhf.bench", fake)
    import fastrlhf

    monkeypatch.setattr(fastrlhf, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "x"]) == 0
    assert seen["argv"] == ["--quick", "x"]


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "fastrlhf", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "{dpo,grpo,ppo,rm,rrhf,rft}" in r.stdout and "--model" in r.stdout
