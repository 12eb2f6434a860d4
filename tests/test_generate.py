"""generate.py as a user runs it: streaming text and metrics, compiled decoding equal to eager, and a one-line
error with exit code 2 for each kind of bad input."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import model as model_py
import s3d
from checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=None if env is None else {**os.environ, **env})


def assert_one_line_error(proc, pattern):
    """Exit code 2, no traceback, and exactly one error line (informational lines such as 'loaded ...' may precede)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-2000:]
    assert pattern in errors[0], errors[0]


def test_generate_streams_text_and_reports_metrics(default_checkpoint):
    proc = run("--max_new_tokens", "16", env={"S3D_NATIVE_BF16": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "--dtype auto: float32 (this CPU has no native bf16" in proc.stderr.splitlines()[0]
    assert "(float32, cpu)" in proc.stderr
    assert proc.stdout.startswith('As the AI, AI-powered robot, "Pixel,"')
    for metric in ("tokens/s", "time to first token", "peak memory", "bandwidth achieved"):
        assert metric in proc.stderr


def test_sampling_is_seeded(default_checkpoint):
    args = ("--max_new_tokens", "10", "--temperature", "0.9", "--top_k", "40", "--top_p", "0.9", "--seed", "7")
    first, second = run(*args), run(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run("--checkpoint", str(tmp_path / "nope")), "does not exist")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    assert_one_line_error(run("--checkpoint", str(tmp_path)), "has no config.json")


@pytest.fixture
def broken_copy(default_checkpoint, tmp_path):
    """A copy of the default checkpoint's small files; the test supplies its own weights or config."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint / name, tmp_path / name)
    return tmp_path


def test_truncated_weights(default_checkpoint, broken_copy):
    with open(default_checkpoint / "model.safetensors", "rb") as f:
        (broken_copy / "model.safetensors").write_bytes(f.read(1 << 20))
    assert_one_line_error(run("--checkpoint", str(broken_copy)), "truncated or corrupt")


def test_corrupt_weights(broken_copy):
    (broken_copy / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 100)
    assert_one_line_error(run("--checkpoint", str(broken_copy)), "truncated or corrupt")


def test_unknown_architecture(default_checkpoint, broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps({**config, "architecture": "GPT2LMHeadModel"}))
    os.symlink(default_checkpoint / "model.safetensors", broken_copy / "model.safetensors")
    assert_one_line_error(run("--checkpoint", str(broken_copy)), "unknown architecture 'GPT2LMHeadModel'")


def test_prompt_longer_than_context(default_checkpoint):
    assert_one_line_error(run("--prompt", "word " * 9000, "--max_new_tokens", "4"), "exceeds the model's context of 8192")


@pytest.mark.parametrize("args,pattern", [
    (("--max_new_tokens", "0"), "--max_new_tokens must be at least 1"),
    (("--device", "tpu"), "unknown device 'tpu'"),
    (("--device", "cuda"), "device 'cuda' is not available"),
    (("--dtype", "float8"), "argument --dtype: invalid choice: 'float8'"),
    (("--top_p", "1.5"), "--top_p must be in (0, 1]"),
    (("--temperature", "nan"), "--temperature must be a number >= 0, got nan"),
    (("--skip", "5:3"), "--skip sets the layers the S3D or layer-skip draft leaves out"),
    (("--gamma", "3"), "--gamma sets the tokens drafted per iteration"),
])
def test_bad_arguments(args, pattern):
    if args == ("--device", "cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is not an error here")
    assert_one_line_error(run(*args), pattern)


def test_compiled_decoding_equals_eager(convert_tiny):
    """Compiled steps (frozen weights on CPU) produce the same tokens as eager ones, greedy and seeded sampling."""
    _, folder = convert_tiny("LlamaForCausalLM")
    model = load_model(folder, "cpu", torch.float32)
    prompt = list(range(3, 15))
    with torch.no_grad():
        assert s3d.ar_generate(model, prompt, 20, compile=True).tokens == s3d.ar_generate(model, prompt, 20).tokens


def test_speculative_cli_reports_tau_and_matches_ar(default_checkpoint):
    proc = run("--max_new_tokens", "24", "--dtype", "float32", "--draft", "skip", "--skip", "10:20", "--gamma", "3",
               "--compare_ar")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('As the AI, AI-powered robot, "Pixel,"')
    assert "tau" in proc.stderr and "acceptance per draft position" in proc.stderr
    assert "identical output" in proc.stderr


def test_compare_ar_tells_a_tie_from_a_mismatch(convert_tiny):
    """--compare_ar's verdict on greedy outputs: identical; parted where the target's two logits are equal (a tie,
    which the algorithm allows); parted where they are far apart (a mismatch, which it does not). Sampled outputs
    may differ anywhere."""
    import generate

    _, folder = convert_tiny("LlamaForCausalLM")
    model = load_model(folder, "cpu", torch.float32)
    prompt, i = list(range(3, 15)), 3
    with torch.no_grad():
        ar = s3d.ar_generate(model, prompt, 8).tokens
        logits = model(torch.tensor([prompt + ar[:i]]), torch.arange(len(prompt) + i))[0, -1]
        other = next(t for t in range(model.config.vocab_size) if t not in prompt + ar)
        model.output.weight[other] = model.output.weight[ar[i]]  # the same logit as AR's token: an exact tie
        worst = logits.argmin().item()
        assert generate.compare_with_ar(model, prompt, ar, list(ar), True) == ("identical output", True)
        text, agree = generate.compare_with_ar(model, prompt, ar, ar[:i] + [other] + ar[i + 1:], True)
        assert agree and text.startswith(f"outputs part at new token {i}, at a tie") and " 0.0 rounding" in text, text
        text, agree = generate.compare_with_ar(model, prompt, ar, ar[:i] + [worst], True)
        assert not agree and text.startswith(f"MISMATCH: the outputs part at new token {i}, where"), text
        assert generate.compare_with_ar(model, prompt, ar, ar[:i] + [worst], False)[1]


def test_compare_ar_exits_1_when_a_broken_rule_leaves_ars_output(tiny_checkpoint, monkeypatch, capsys):
    """A greedy acceptance rule that keeps every draft gives another output than AR's: generate.py --compare_ar says
    so and exits 1, where the real rule gives AR's output and exits 0."""
    import generate

    argv = ["--checkpoint", str(tiny_checkpoint), "--dtype", "float32", "--draft", "skip", "--skip", "1:3",
            "--gamma", "3", "--max_new_tokens", "16", "--compare_ar"]
    generate.main(argv)
    assert "identical output" in capsys.readouterr().err

    def accept_all(drafts, target_logits):
        return torch.tensor(drafts.shape[0]), torch.cat([drafts, target_logits[-1:].argmax(-1)])

    monkeypatch.setattr(s3d, "accept_greedy", accept_all)
    with pytest.raises(SystemExit) as exited:
        generate.main(argv)
    assert exited.value.code == 1
    assert "MISMATCH: the outputs part at new token" in capsys.readouterr().err


@pytest.mark.parametrize("native,dtype", [("0", "float32"), ("1", "bfloat16")])
def test_dtype_auto_follows_the_cpu_and_s3d_equals_ar_in_both(default_checkpoint, native, dtype):
    """--dtype auto picks bfloat16 where the CPU has native bf16 matrix instructions (forced here both ways), says
    so in one line, and greedy S3D with the shipped heads gives AR's output in that dtype."""
    proc = run("--max_new_tokens", "24", "--s3d", HEADS, "--compare_ar", env={"S3D_NATIVE_BF16": native})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[0].startswith(f"--dtype auto: {dtype} (")
    assert f"({dtype}, cpu)" in proc.stderr
    # --adaptive's default follows the CPU too: on without native bf16, where its AR steps show in the summary
    assert ("--adaptive auto: on (" in proc.stderr) == ("AR steps taken instead" in proc.stderr) == (native == "0")
    # and so does g: 3 of the heads' 4 without native bf16, where the summary's acceptance has 3 positions
    assert ("--gamma auto: 3 (" in proc.stderr) == (native == "0")
    rates = re.search(r"acceptance per draft position ([\d. ]+)", proc.stderr)[1].split()
    assert len(rates) == (3 if native == "0" else 4), proc.stderr[-2000:]
    if "identical output" not in proc.stderr:
        # bfloat16 rounds a 5-token verify and a 1-token AR step differently: the outputs may part only where the
        # target's two best logits are within a rounding step or so (a tie; generate.compare_with_ar)
        assert dtype == "bfloat16" and "at a tie" in proc.stderr, proc.stderr[-2000:]


def test_adaptive_auto_follows_the_cpu(monkeypatch, capsys):
    """--adaptive's default: on for S3D or layer-skip drafts on a CPU without native bf16 (and says so), off with
    native bf16, on other devices, for the model draft and without a draft; --adaptive and --no-adaptive win."""
    import cli

    s3d_draft, skip_draft, cpu = s3d.Draft("s3d", 4), s3d.Draft("skip", 4, (1, 3)), torch.device("cpu")
    monkeypatch.setattr(cli, "native_bf16", lambda: [])
    assert cli.resolve_adaptive(None, s3d_draft, cpu) and cli.resolve_adaptive(None, skip_draft, cpu)
    assert capsys.readouterr().err.count("--adaptive auto: on (") == 2
    assert not cli.resolve_adaptive(False, s3d_draft, cpu)
    assert not cli.resolve_adaptive(None, None, cpu) and not cli.resolve_adaptive(None, s3d.Draft("model", 4), cpu)
    assert not cli.resolve_adaptive(None, s3d_draft, torch.device("cuda"))
    monkeypatch.setattr(cli, "native_bf16", lambda: ["avx512_bf16"])
    assert not cli.resolve_adaptive(None, s3d_draft, cpu) and cli.resolve_adaptive(True, s3d_draft, cpu)
    assert capsys.readouterr().err == ""


def test_gamma_auto_follows_the_cpu(tiny_checkpoint, monkeypatch, capsys):
    """g's default for the S3D draft: 3 on a CPU without native bf16 (and says so), the heads' (4) with native bf16
    and on other devices; --gamma, a tree's depth and heads of g <= 3 win, and the skip draft keeps 4."""
    import cli

    cpu = torch.device("cpu")
    monkeypatch.setattr(cli, "native_bf16", lambda: [])
    assert cli.default_gamma(4, cpu) == 3 and "--gamma auto: 3 (" in capsys.readouterr().err
    assert cli.default_gamma(2, cpu) == 2 and cli.default_gamma(4, torch.device("cuda")) == 4
    model = load_model(tiny_checkpoint, "cpu", torch.float32)
    assert cli.make_draft(model, "s3d").gamma == 3
    assert cli.make_draft(model, "s3d", 4).gamma == 4
    assert cli.make_draft(model, "s3d", tree=s3d.parse_tree("2,1,1,1")).gamma == 4
    assert cli.make_draft(model, "skip").gamma == 4
    capsys.readouterr()
    monkeypatch.setattr(cli, "native_bf16", lambda: ["avx512_bf16"])
    assert cli.make_draft(model, "s3d").gamma == 4 and "--gamma auto" not in capsys.readouterr().err


@pytest.mark.parametrize("flags,attend,kv_dtype,attention_dtype", [
    ([], False, torch.float32, torch.float32),  # AVX2: float32 attention over a float32 cache
    (["avx512_bf16"], True, torch.bfloat16, torch.float32),  # cpu_kernels.attend reads the bfloat16 cache
    (["avx512_bf16"], False, torch.float32, torch.float32),  # (its build or S3D_ATTEND=0 turned off)
    (["amx_bf16", "avx512_bf16"], True, torch.bfloat16, None)])  # AMX: the library's bf16 attention
def test_cpu_attention_and_cache_dtypes(tiny_checkpoint, monkeypatch, flags, attend, kv_dtype, attention_dtype):
    """A bfloat16 model on a CPU: where attention computes in float32 and what the KV cache keeps."""
    import cli
    import cpu_kernels

    monkeypatch.setattr(cli, "native_bf16", lambda: flags)
    monkeypatch.setattr(cpu_kernels, "may_attend", lambda: attend)
    monkeypatch.setattr(model_py, "FLOAT32_MATMUL", model_py.FLOAT32_MATMUL)  # (restored after cli.load sets it)
    model, _ = cli.load(tiny_checkpoint, torch.device("cpu"), torch.bfloat16)
    model.setup_caches(1, 64)
    cache = model.layers[0].attention.kv_cache
    assert cache.k_cache.dtype == cache.v_cache.dtype == kv_dtype and cache.attention_dtype == attention_dtype
    assert model_py.FLOAT32_MATMUL == (not flags)  # a prefill's bfloat16 rows multiply in float32 without native bf16


@pytest.mark.parametrize("kernels", [False, True])
def test_w8a8_without_the_int8_kernel_says_it_is_slow(tiny_checkpoint, monkeypatch, capsys, kernels):
    """--quantize w8a8 --compile on a CPU without cpu_kernels' int8 kernel (forced here both ways) notes that
    w8a8 is slow there and bfloat16 is the faster choice; with the kernel, no note."""
    import argparse

    import cpu_kernels
    import generate

    monkeypatch.setattr(cpu_kernels, "int8_kernel", lambda: kernels)
    args = argparse.Namespace(checkpoint=tiny_checkpoint, dtype="bfloat16", quantize="w8a8", groupsize=128,
                              compile=True)
    model, _ = generate.load_weights(args, torch.device("cpu"))
    assert model.quantization == "w8a8"
    assert ("note: w8a8 runs fast only with cpu_kernels' int8 kernel" in capsys.readouterr().err) == (not kernels)


@pytest.mark.parametrize("native,quantize,compile,dtype", [
    (["avx512_bf16"], None, False, "bfloat16"), ([], None, True, "bfloat16"), ([], None, False, "float32"),
    ([], "w8a8", False, "bfloat16")])
def test_dtype_auto_on_a_cpu(monkeypatch, capsys, native, quantize, compile, dtype):
    """--dtype auto on a CPU: bfloat16 with native bf16, for quantized weights, and compiled without native bf16
    (bfloat16 weights read by the compiled steps); float32 only uncompiled without it. One line says why."""
    import cli

    monkeypatch.setattr(cli, "native_bf16", lambda: native)
    assert cli.resolve_dtype("auto", torch.device("cpu"), quantize, compile) == dtype
    line = capsys.readouterr().err
    assert line.startswith(f"--dtype auto: {dtype} (") and line.count("\n") == 1
    assert cli.resolve_dtype("float16", torch.device("cpu"), quantize, compile) == "float16"  # a choice is kept


@pytest.mark.parametrize("policy,device,warned", [
    ("PASSIVE", "cpu", True), (" passive", "cpu", True), ("ACTIVE", "cpu", False), (None, "cpu", False),
    ("PASSIVE", "meta", False)])
def test_a_passive_openmp_wait_policy_is_named_on_a_cpu(monkeypatch, capsys, policy, device, warned):
    """OMP_WAIT_POLICY=passive (any case) slows compiled CPU decoding 2 to 3 times: one line says so where the
    weights load for a CPU, and nothing is said for another policy, none, or another device."""
    import cli

    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    cli.check_openmp_wait_policy(torch.device(device))
    err = capsys.readouterr().err
    assert (err.startswith("warning: OMP_WAIT_POLICY=passive ") and err.count("\n") == 1) == warned
    assert warned or err == ""


def test_the_wait_policy_warning_comes_from_the_programs(default_checkpoint):
    proc = run("--max_new_tokens", "2", env={"OMP_WAIT_POLICY": "passive"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: OMP_WAIT_POLICY=passive puts OpenMP's threads to sleep" in proc.stderr


def test_s3d_heads_file_cli(default_checkpoint, tmp_path):
    model = load_model(default_checkpoint, "cpu", torch.float32)
    from heads import new_heads

    new_heads(model, (8, 22), 3, 4).save(tmp_path / "heads.safetensors")
    proc = run("--max_new_tokens", "16", "--dtype", "float32", "--s3d", str(tmp_path / "heads.safetensors"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('As the AI, AI-powered robot, "Pixel,"')
    assert_one_line_error(run("--s3d", str(tmp_path / "heads.safetensors"), "--gamma", "5"),
                          "gamma 5 exceeds the 3 tokens these heads draft")


@pytest.mark.parametrize("args,pattern", [
    (("--draft", "skip", "--skip", "20:10"), "invalid skip range 20:10"),
    (("--draft", "skip", "--skip", "0:30"), "invalid skip range 0:30"),
    (("--draft", "skip", "--skip", "ten"), "expected S:E"),
    (("--draft", "s3d", "--gamma", "0"), "--gamma must be at least 1"),
    (("--draft", "model",), "the model draft needs --draft_checkpoint"),
    (("--s3d", "/nonexistent/heads.safetensors"), "cannot read heads file"),
    (("--s3d", "x.safetensors", "--draft", "skip"), "--s3d goes with --draft s3d"),
    (("--show_drafts",), "--show_drafts shows speculative iterations"),
    (("--tree", "3,2,1,1"), "--tree verifies the S3D draft's candidates: add --s3d HEADS"),
    (("--draft", "skip", "--tree", "2,1"), "not the skip draft's"),
    (("--draft", "s3d", "--tree", "3,x"), "--tree takes candidates per depth such as 3,2,1,1"),
    (("--draft", "s3d", "--tree", "3,0"), "at least one candidate per depth"),
    (("--draft", "s3d", "--tree", "20,20"), "has 420 nodes; at most 256"),
    (("--draft", "s3d", "--tree", "2,1", "--gamma", "3"), "drop --gamma 3"),
    (("--tree", "chain"), "--tree chain is for the S3D draft: add --s3d HEADS"),
    (("--draft", "skip", "--tree", "chain"), "--tree chain is for the S3D draft"),
    (("--draft_weights", "int8"), "--draft_weights int8 is for the S3D draft: add --s3d HEADS"),
    (("--draft", "skip", "--draft_weights", "int8"), "--draft_weights int8 is for the S3D draft"),
    (("--draft", "s3d", "--rank", "0", "--draft_weights", "int8"), "they need heads with adapters (rank > 0)"),
    (("--adaptive",), "--adaptive chooses between AR steps and S3D or layer-skip drafts"),
    (("--draft", "model", "--draft_checkpoint", "x", "--adaptive"), "--adaptive chooses between AR steps"),
    (("--lookup", "4"), "--lookup copies drafts in place of the S3D or layer-skip draft's"),
    (("--draft", "skip", "--lookup", "1"), "--lookup matches 2 tokens or more, not 1"),
    (("--draft", "s3d", "--tree", "2,1", "--lookup", "3"), "context lookup goes with a chain"),
])
def test_bad_speculative_arguments(args, pattern, default_checkpoint):
    assert_one_line_error(run(*args), pattern)


HEADS = os.path.join(ROOT, "heads", "smollm2-135m-instruct.safetensors")


def test_a_tree_deeper_than_the_heads_is_refused(default_checkpoint):
    assert_one_line_error(run("--s3d", HEADS, "--tree", "2,1,1,1,1"), "exceeds")
ITERATION = re.compile(r"^ *(\d+)  (\d+)/(\d+)  (copy )?")


def show_drafts_lines(stdout: str) -> list[tuple[int, int, bool]]:
    """(n, g, whether the drafts were copied) of every iteration line that --show_drafts printed, in order."""
    found = [ITERATION.match(line) for line in stdout.splitlines()]
    return [(int(m[2]), int(m[3]), m[4] is not None) for m in found if m]


def test_tree_auto_is_a_tree_on_a_gpu_and_the_chain_on_a_cpu():
    """--tree auto (cli.default_tree): 3, 2, then 1 candidate per depth, as deep as g, on CUDA, where more verify
    rows cost little; the chain on a CPU."""
    import cli

    assert cli.default_tree(torch.device("cuda"), 4) == s3d.top_k_tree((3, 2, 1, 1))
    assert cli.default_tree(torch.device("cuda"), 2) == s3d.top_k_tree((3, 2))
    assert cli.default_tree(torch.device("cuda"), 1) == s3d.top_k_tree((3,))
    assert cli.default_tree(torch.device("cpu"), 4) is None


@pytest.mark.parametrize("draft_args,kind", [(("--s3d", HEADS), "s3d"), (("--draft", "skip", "--skip", "8:22"), "skip"),
                                             (("--s3d", HEADS, "--tree", "3,2,1,1"), "s3d"),
                                             (("--s3d", HEADS, "--tree", "chain"), "s3d")])
def test_show_drafts_matches_the_loop(default_checkpoint, draft_args, kind):
    """--show_drafts prints one line per iteration whose accepted length is the loop's, then the text and a
    histogram of the same lengths; piped, it has no escape codes. A chain copies drafts from the context by
    default (--lookup 4), and the lines say which."""
    from heads import load_heads
    from tokenizer import Tokenizer

    prompt_text = "Repeat this sentence three times: the cat sat on the mat."  # (copies for --lookup)
    proc = run("--dtype", "float32", "--max_new_tokens", "24", "--prompt", prompt_text, "--show_drafts", "--no-adaptive",
               "--gamma", "4", *draft_args)  # (on a CPU without native bf16 --adaptive is on by default, and g is 3)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\033" not in proc.stdout

    model, tokenizer = load_model(default_checkpoint, "cpu", torch.float32), Tokenizer(default_checkpoint)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}]), bos=False)
    if kind == "s3d":
        model.set_heads(load_heads(HEADS, model.config))
    with torch.no_grad():
        tree = s3d.parse_tree(draft_args[-1]) if "--tree" in draft_args and draft_args[-1] != "chain" else None
        draft = s3d.Draft(kind, 4, (8, 22) if kind == "skip" else None, tree=tree, lookup=0 if tree else 4)
        result = s3d.speculative_generate(model, prompt, 24, draft, eos_ids=tokenizer.eos_ids)
    if draft_args == ("--s3d", HEADS):  # --tree auto on this CPU: the chain, and it says so
        assert "--tree auto: the chain (a cpu device)" in proc.stderr, proc.stderr
    assert show_drafts_lines(proc.stdout) == [(n, 4, c) for n, c in zip(result.accepted, result.copied)]
    assert any(result.copied) == (tree is None)
    assert tokenizer.decode(result.tokens, skip_special=True) in proc.stdout
    for k in range(5):
        assert re.search(rf"^ +{k} \| #* +{result.accepted.count(k)}$", proc.stdout, re.M), proc.stdout


def test_adaptive_show_drafts_marks_the_ar_steps_and_the_text_is_ar(default_checkpoint):
    """With --adaptive the first steps are AR steps (they time one), shown as such; the answer is AR's."""
    prompt_text = "Name three prime numbers."
    common = ("--dtype", "float32", "--max_new_tokens", "24", "--prompt", prompt_text)
    proc = run(*common, "--show_drafts", "--adaptive", "--s3d", HEADS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ar_lines = re.findall(r"^ +AR +-> \[", proc.stdout, re.M)
    assert len(ar_lines) >= 3
    assert re.search(rf"^{len(ar_lines)} AR steps taken instead of iterations", proc.stderr, re.M), proc.stderr
    ar = run(*common)
    assert ar.returncode == 0, ar.stderr[-2000:]
    assert ar.stdout.strip() in proc.stdout


def test_show_drafts_colours_only_change_the_colour(default_checkpoint):
    """On a terminal the same text is printed, with accepted drafts green and the rejected one red."""
    from generate import DraftView
    from tokenizer import Tokenizer

    tokenizer = Tokenizer(default_checkpoint)
    drafts, outputs = [[t] for t in tokenizer.encode(" the robot was a", bos=False)], {}
    the, robot, was, a = (d[0] for d in drafts)
    for color in (False, True):
        view = DraftView(tokenizer, 4, color)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            view(drafts, 2, the)
            view(drafts, len(drafts), robot)
            view([[the, a], [robot], [was, a]], 2, the)  # a tree: the accepted candidate first, then its rivals
        outputs[color] = out.getvalue()
    assert "\033" not in outputs[False]
    assert f"{DraftView.GREEN}[ the]{DraftView.RESET}" in outputs[True]
    assert f"{DraftView.RED}[ was]{DraftView.RESET}" in outputs[True]
    assert re.sub(r"\033\[[0-9;]*m", "", outputs[True]) == outputs[False]
    assert outputs[False].splitlines()[0] == "   1  2/4  [ the][ robot] x[ was] -> [ the]  ([ a])"
    assert outputs[False].splitlines()[1] == "   2  4/4  [ the][ robot][ was][ a] + [ robot]"
    assert outputs[False].splitlines()[2] == "   3  2/4  [ the]{[ a]}[ robot] x[ was][ a] -> [ the]"


def test_a_chat_drops_its_oldest_turns_to_fit(tiny_checkpoint, capsys):
    import cli
    import generate

    model, tokenizer = cli.load(tiny_checkpoint, torch.device("cpu"), torch.float32)
    long = "word " * 600  # about 600 tokens
    messages = [{"role": r, "content": long} for r in ("user", "assistant", "user", "assistant")]
    messages.append({"role": "user", "content": "short"})
    max_new_tokens = model.config.block_size - 900  # room for one long message, not for three
    assert generate.fit_chat(model, tokenizer, messages, True, max_new_tokens, None) == messages[4:]
    assert "(the 2 oldest turns left the context to make room)" in capsys.readouterr().err
    assert generate.fit_chat(model, tokenizer, messages[2:], True, 16, None) == messages[2:]  # all fit: all kept
    assert generate.fit_chat(model, tokenizer, [{"role": "user", "content": long * 4}], True, max_new_tokens, None) is None
    assert "(not answered: the prompt (" in capsys.readouterr().err


def test_an_interactive_chat_survives_a_bad_turn(default_checkpoint):
    """A line that is not UTF-8 and a turn longer than the context are each refused with a note, and the chat goes
    on: the next question is answered."""
    stdin = b"Hi\n\xff\xfe\n" + b"word " * 9000 + b"\nBye\n"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--interactive", "--max_new_tokens", "4"],
                          input=stdin, capture_output=True, timeout=300, cwd=ROOT)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    # (stdin decodes bad bytes as an error or, in a C locale, as surrogates that the prompt check refuses)
    assert "(that line was not UTF-8 text: try again)" in err or "(not answered: the prompt is not valid UTF-8" in err
    assert "(not answered: the prompt (" in err
    assert err.count("tokens/s per GiB") == 2  # Hi and Bye were answered


@pytest.mark.parametrize("args,pattern", [
    (("--prompt", "", "--no-chat"), "the prompt is empty"),
    (("--prompt", "caf\udcff"), "the prompt is not valid UTF-8 text"),
])
def test_empty_or_broken_prompts(args, pattern):
    assert_one_line_error(run(*args, "--max_new_tokens", "4"), pattern)
