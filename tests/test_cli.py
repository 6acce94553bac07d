"""``fastrlhf train {dpo,grpo,ppo}`` and ``fastrlhf bench`` (CPU, a few steps each)."""

import dataclasses
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

from fastrlhf import cli, cli_config
from fastrlhf.algos import build_char_tokenizer, tiny_causal_lm
from fastrlhf.algos.rewards import WeightedRewards

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


@pytest.mark.parametrize("max_operand", [2, 3, 5])
def test_rm_on_a_small_task_keeps_held_out_pairs(max_operand, tmp_path):
    """Sums up to 2 * (max_operand - 1) leave fewer wrong answers than the ranking's 9: the ranking shrinks so
    that every prompt keeps a held-out wrong sum (it used to leave none, and the held-out evaluation crashed)."""
    from fastrlhf.algos.task import ArithmeticTask

    task = ArithmeticTask(max_operand=max_operand, seed=0)
    ranked = cli.task_ranking_rows(task, seed=0)
    held = cli.task_ranking_rows(task, seed=0, held_out=True)
    assert {r["prompt"] for r in held} == {r["prompt"] for r in ranked}
    for r in ranked:
        assert len(r["responses"]) == min(1 + cli.TASK_RM_WRONG_PER_PROMPT, 2 * (max_operand - 1))  # one kept out
        seen = set(r["responses"])
        assert not seen & {h["rejected"] for h in held if h["prompt"] == r["prompt"]}
    if max_operand == 5:
        s = cli.train(cli.build_parser().parse_args(["train", "rm", "--task-max-operand", "5", "--output-dir",
                                                     str(tmp_path / "rm"), *FAST, "--micro-batch-size", "4"]))
        assert len(s["eval_pair_accuracy_unseen_responses"]) == 2


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
    assert r.returncode == 0 and "{dpo,grpo,ppo,rm,rrhf,rft}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastrlhf", "train", "grpo", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--model" in r.stdout and "--group-size" in r.stdout


# ----------------------------------------------------------------------------------------
# The generated command line: per-algorithm flags, --config YAML, README flags, rewards, eval
# ----------------------------------------------------------------------------------------


def _flag_in(flag, text):
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def _field_flags(algo):
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cli_config.config_classes()[algo])
            if f.name not in cli_config.RUN_FIELDS}


@pytest.mark.parametrize("algo", cli.ALGOS)
def test_algo_help_lists_its_own_fields_only(algo, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", algo, "--help"])
    text = capsys.readouterr().out
    own = _field_flags(algo)
    assert own and all(_flag_in(f, text) for f in own), sorted(f for f in own if not _flag_in(f, text))
    others = set().union(*(_field_flags(a) for a in cli.ALGOS if a != algo)) - own
    assert others and not any(_flag_in(f, text) for f in others), sorted(f for f in others if _flag_in(f, text))
    assert _flag_in("--reward-fn", text) == (algo in cli_config.ROLLOUT)
    assert "--no-fused-linear" in text and "--grad-accum" in text  # the old spellings still work


def test_field_help_comes_from_the_dataclass_docstrings():
    docs = cli_config.field_docs(cli_config.config_classes()["grpo"])
    assert docs["group_size"] == "G: completions sampled per prompt."  # GRPOConfig's own field
    assert docs["seed"].startswith("Seeds the data order")  # TrainConfig's, inherited
    assert set(docs) == {f.name for f in dataclasses.fields(cli_config.config_classes()["grpo"])}


def _parse(argv):
    args = cli.build_parser().parse_args(argv)
    cli_config.apply_config_file(args)
    return args


def test_yaml_config_under_the_command_line(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("lr: 1e-3\ngroup-size: 3\nmicro_batch_size: 8\nmax_grad_norm: null\nfused_linear: false\n"
                   "adam_betas: [0.9, 0.95]\nreward_fn: a.py:f\nbeta: 0.5\n")
    args = _parse(["train", "grpo", "--config", str(run), "--beta", "0.25", "--grad-accum", "2"])
    values = cli_config.config_values(args, cli_config.config_classes()["grpo"], cli.TASK_DEFAULTS["grpo"])
    assert values["lr"] == 1e-3 and isinstance(values["lr"], float)  # PyYAML reads 1e-3 as a string
    assert values["group_size"] == 3 and values["micro_batch_size"] == 8 and values["max_grad_norm"] is None
    assert values["beta"] == 0.25 and values["gradient_accumulation_steps"] == 2  # the command line wins
    assert values["fused_linear"] is False and values["adam_betas"] == (0.9, 0.95)
    assert values["steps"] == cli.TASK_DEFAULTS["grpo"]["steps"] and values["save_every"] == 100
    assert args.reward_fn == ["a.py:f"]
    none = _parse(["train", "grpo", "--max-grad-norm", "none", "--clip-high", "0.3"])
    values = cli_config.config_values(none, cli_config.config_classes()["grpo"], {})
    assert values["max_grad_norm"] is None and values["clip_high"] == 0.3


def test_yaml_config_errors_name_the_key(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("grup_size: 4\n")
    with pytest.raises(SystemExit, match="unknown key 'grup_size'.*did you mean 'group_size'"):
        _parse(["train", "grpo", "--config", str(run)])
    run.write_text("loss_type: ipo\n")  # a DPO field is not a GRPO option
    with pytest.raises(SystemExit, match="unknown key 'loss_type' for fastrlhf train grpo"):
        _parse(["train", "grpo", "--config", str(run)])
    run.write_text("loss_type: nope\n")
    with pytest.raises(SystemExit, match="loss_type.*must be one of"):
        _parse(["train", "dpo", "--config", str(run)])
    run.write_text("steps: many\n")
    with pytest.raises(SystemExit, match="'steps'"):
        _parse(["train", "dpo", "--config", str(run)])


README_OTHER_TOOLS = {"--nproc_per_node", "--config_file", "--list",  # torchrun, accelerate, fastrlhf bench
                      "--no-build-isolation",  # pip (installing DeepSpeed)
                      "--field-name", "--flag", "--no-flag"}  # the Configuration paragraph's placeholders


def test_every_readme_flag_parses():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", readme)) - README_OTHER_TOOLS
    assert {"--model", "--dataset", "--reward-fn", "--resume", "--config"} <= flags
    flags.discard("--help")  # test_algo_help_lists_its_own_fields_only
    parser = cli.build_parser()
    options = {algo: {s: a for a in cli_config.algo_parser(algo)._actions for s in a.option_strings}
               for algo in cli.ALGOS}
    for flag in sorted(flags):
        parsed = False
        for algo, actions in options.items():
            if flag in actions:
                a = actions[flag]
                value = [] if a.nargs == 0 else [str(a.choices[-1]) if a.choices else "1"]
                parser.parse_args(["train", algo, flag, *value])
                parsed = True
        assert parsed, f"README flag {flag} is not an option of any `fastrlhf train` algorithm"
    # The README's whole command lines, as written.
    for line in re.findall(r"(?:fastrlhf\)?|-m fastrlhf) (train [^`\n]+)", readme):
        train, algo, *rest = line.split()
        if algo == "...":  # the layout table's `fastrlhf train ...`
            continue
        algos = cli.ALGOS if algo == "<algo>" else algo.strip("{}").split(",")  # `train {grpo,ppo,dpo}`
        for one in algos:
            parser.parse_args([train, one, *[x for x in rest if x != "--help"]])


REWARDS_PY = '''
def exact(prompts, completions, answer, **kw):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def short(prompts, completions, **kw):
    return [1.0 / (1 + len(c)) for c in completions]
'''


def test_weighted_rewards_sum_and_components():
    mod = types.ModuleType("m")
    exec(REWARDS_PY, mod.__dict__)
    w = WeightedRewards([mod.exact, mod.short], [1.0, 0.5])
    out = w(prompts=["1+1=", "2+2="], completions=["2", "55"], answer=["2", "4"], completion_ids=[[1], [2, 2]])
    assert out == pytest.approx([1.0 + 0.5 * 0.5, 0.0 + 0.5 / 3])
    assert w.pop_means() == pytest.approx({"reward/exact": 0.5, "reward/short": (0.5 + 1 / 3) / 2})
    assert w.pop_means() == {}
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        WeightedRewards([mod.exact, mod.short], [1.0])


def test_grpo_two_weighted_rewards_eval_split_and_yaml(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    fn = str(tmp_path / "rewards.py")
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text("\n".join(json.dumps({"prompt": f"{a}+2=", "solution": str(a + 2)}) for a in range(5)))
    run = tmp_path / "run.yaml"
    run.write_text(f"eval_every: 1\neval-dataset: {eval_rows}\nprompts_per_step: 4\ngroup_size: 2\n"
                   f"micro_batch_size: 8\ngradient_accumulation_steps: 1\nno_plot: true\n")
    out = tmp_path / "g"
    cli.main(["train", "grpo", "--config", str(run), "--output-dir", str(out), *FAST,
              "--reward-fn", f"{fn}:exact", "--reward-fn", f"{fn}:short", "--reward-weights", "1.0", "0.5"])
    lines = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert r["reward"] == pytest.approx(r["reward/exact"] + 0.5 * r["reward/short"], abs=1e-5)
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and 0.0 < r["reward/short"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert "eval_accuracy" in summary and "curves" not in summary
    assert json.loads((out / "args.json").read_text())["prompts_per_step"] == 4
    with pytest.raises(SystemExit, match="2 --reward-fn but 1 --reward-weights"):
        cli.main(["train", "grpo", "--output-dir", str(tmp_path / "x"), *FAST, "--reward-fn", f"{fn}:exact",
                  "--reward-fn", f"{fn}:short", "--reward-weights", "1.0"])


def _fake_hub_cache(root, kind, repo, files_from):
    snap = root / f"{kind}s--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    shutil.copytree(files_from, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    return snap


def test_hub_ids_from_the_local_cache_and_dpo_eval(local_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_snap = _fake_hub_cache(cache, "model", "me/tiny", local_checkpoint)
    data = tmp_path / "data"
    data.mkdir()
    pairs = [json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a)}) for a in range(8)]
    (data / "train.jsonl").write_text("\n".join(pairs))
    (data / "test.jsonl").write_text("\n".join(pairs[:4]))
    _fake_hub_cache(cache, "dataset", "me/pairs", data)
    assert cli_config.resolve_pretrained("me/tiny", "--model") == str(model_snap)
    with pytest.raises(FileNotFoundError, match="--model 'me/absent'.*Hugging Face cache"):
        cli_config.resolve_pretrained("me/absent", "--model")
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli_config.resolve_pretrained(str(tmp_path / "nowhere.jsonl"), "--dataset", "dataset")
    out = tmp_path / "d"
    cli.main(["train", "dpo", "--model", "me/tiny", "--dataset", "me/pairs", "--eval-dataset", "me/pairs",
              "--eval-every", "1", "--steps", "2", "--micro-batch-size", "4", "--no-progress", "--no-plot",
              "--output-dir", str(out)])
    lines = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2] and all(0 <= r["eval_reward_accuracy"] <= 1 for r in lines)
    assert json.loads((out / "args.json").read_text())["model"] == str(model_snap)


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    args = ["train", "dpo", "--report-to", "tensorboard", "--steps", "1", "--warmup-steps", "1",
            "--micro-batch-size", "4", "--no-progress", "--no-plot"]
    if importlib.util.find_spec("tensorboard") is not None:
        cli.main([*args, "--output-dir", str(tmp_path / "tb")])
        assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(SystemExit, match="needs the tensorboard package"):
        cli.main([*args, "--output-dir", str(tmp_path / "none")])
