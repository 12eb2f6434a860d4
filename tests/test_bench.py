"""bench.py on a tiny model and a tiny prompt file: every JSON field, multi-turn rows, the speed model, the sweep's
plot, and a deliberately wrong speculative answer reported as a mismatch."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import s3d
import spec_bench

ROOT = bench.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "tiny.jsonl"
    rows = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now make it sadder."]},
            {"question_id": 2, "category": "qa", "turns": ["What is a KV cache?"]},
            {"question_id": 3, "category": "qa", "turns": ["Why is the sky blue?"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def bench_json(tmp_path, *args):
    out = tmp_path / "out.json"
    bench.main(["--no-compile", "--max_new_tokens", "6", "--json", str(out), *args])
    return json.loads(out.read_text())


def test_evaluation_json_has_every_field(tiny_checkpoint, prompts, tmp_path):
    result = bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--limit", "5",
                        "--methods", "ar", "s3d", "skip", "model", "adaptive", "lookup", "hf", "--skip", "1:3",
                        "--gamma", "3",
                        "--draft_checkpoint", str(tiny_checkpoint))
    assert set(result) == {"machine", "args", "records", "summary", "mismatches"}
    assert set(result["summary"]) == {"ar", "s3d", "skip", "model", "adaptive", "lookup", "hf"}
    # 3 rows, 4 turns (the first row has two), each answered by each method
    assert len(result["records"]) == 4 * 7
    assert {(r["question_id"], r["turn"]) for r in result["records"]} == {(1, 0), (1, 1), (2, 0), (3, 0)}
    for r in result["records"]:
        assert set(r) == {"question_id", "category", "turn", "round", "method", "prompt_tokens", "new_tokens", "decode_s",
                          "time_to_first_token_s", "tokens_per_s", "iterations", "accepted", "tau", "matches_ar",
                          "first_difference", "gap_ulps", "tokens", "paths", "ar_steps", "copied"}
        assert 1 <= r["new_tokens"] <= 6 and r["paths"] == []  # (a tree's accepted nodes: no tree here)
    second_turn = next(r for r in result["records"] if r["turn"] == 1 and r["method"] == "ar")
    first_turn = next(r for r in result["records"] if r["question_id"] == 1 and r["turn"] == 0 and r["method"] == "ar")
    assert second_turn["prompt_tokens"] > first_turn["prompt_tokens"] + first_turn["new_tokens"]  # the answer is in it
    for method, f in result["summary"].items():
        assert set(f) >= {"answers", "tokens_per_s", "speedup", "tau", "acceptance", "matches_ar", "peak_memory_gib",
                          "tokens_per_s_per_gib", "categories"}
        assert set(f["categories"]) == {"writing", "qa"} and f["peak_memory_gib"] > 0
        assert f["tokens_per_s_per_gib"] == pytest.approx(f["tokens_per_s"] / f["peak_memory_gib"])
    for method in ("s3d", "skip", "model", "adaptive", "lookup"):  # greedy speculative decoding is AR's output
        f = result["summary"][method]
        assert f["matches_ar"] == 4 and len(f["acceptance"]) == 3
        # adaptive decoding's first steps are AR steps (they time one); the others take none
        assert (f["ar_steps"] > 0) == (method == "adaptive")
        accepted = [n for r in result["records"] if r["method"] == method for n in r["accepted"]]
        assert f["tau"] == pytest.approx(s3d.mean_tokens_per_iteration(accepted))
        copied = [c for r in result["records"] if r["method"] == method for c in r["copied"]]
        # (adaptive: with the lookup, as generate.py --adaptive decodes)
        assert len(copied) == len(accepted) and f["copied"] == sum(copied)
        assert (f["copied"] > 0) == (method in ("lookup", "adaptive"))
        if method == "lookup":  # tau over the copied iterations and over the others make up the whole
            taus = [f[k] * sum(c == (k == "tau_copied") for c in copied) for k in ("tau_copied", "tau_drafted")]
            assert sum(taus) == pytest.approx(f["tau"] * len(copied))
    assert result["mismatches"] == [] and result["summary"]["ar"]["speedup"] == pytest.approx(1.0)


def test_a_wrong_speculative_answer_is_reported(tiny_checkpoint, prompts, tmp_path, monkeypatch, capsys):
    """Inject a bug: the acceptance rule emits one token the target did not choose."""
    def wrong_bonus(drafts, target_logits):
        n, tokens = s3d.accept_greedy.__wrapped__(drafts, target_logits)
        return n, (tokens + 1) % target_logits.shape[-1]

    wrong_bonus.__wrapped__ = s3d.accept_greedy
    monkeypatch.setattr(s3d, "accept_greedy", wrong_bonus)
    with pytest.raises(SystemExit) as exit:  # bench.py exits with code 1 on a mismatch
        bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--methods", "ar", "skip",
                   "--skip", "1:3")
    assert exit.value.code == 1
    result = json.loads((tmp_path / "out.json").read_text())
    assert {(m["method"], m["question_id"], m["turn"]) for m in result["mismatches"]} == \
        {("skip", 1, 0), ("skip", 1, 1), ("skip", 2, 0)}  # --limit 1: one row per category, every turn
    assert all(m["first_difference"] == 1 for m in result["mismatches"])  # the first token after prefill's
    assert all(m["gap_ulps"] > spec_bench.TIE_ULPS for m in result["mismatches"])  # a wrong token is not excused as a tie
    assert "MISMATCH: skip differs from AR on question 1 turn 0" in capsys.readouterr().err


def test_categories_choose_the_rows(tiny_checkpoint, prompts, tmp_path, capsys):
    common = ["--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--limit", "5", "--methods", "ar"]
    result = bench_json(tmp_path, *common, "--categories", "qa")
    assert [(r["question_id"], r["category"]) for r in result["records"]] == [(2, "qa"), (3, "qa")]
    assert "at most 5 per category of qa" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:  # a category the file does not have: one line, exit code 2
        bench_json(tmp_path, *common, "--categories", "poetry", "--force")
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == f"bench.py: error: --categories poetry: not in {prompts} (it has qa, writing)"


def test_interleaved_evaluation_answers_each_row_with_every_method_in_turn(tiny_checkpoint, prompts, tmp_path,
                                                                          capsys):
    common = ["--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--limit", "5", "--methods", "ar",
              "s3d", "skip", "--skip", "1:3", "--gamma", "3"]
    blocked = bench_json(tmp_path, *common, "--force")
    capsys.readouterr()
    mixed = bench_json(tmp_path, *common, "--interleave", "--force")
    assert "AR and the other methods in turn on each prompt" in capsys.readouterr().out
    order = [(r["question_id"], r["method"]) for r in mixed["records"]]
    assert order == [(q, m) for q, turns in ((1, 2), (2, 1), (3, 1)) for m in ("ar", "s3d", "skip")
                     for _ in range(turns)]  # row by row, every method answering all of a row's turns
    assert [(r["question_id"], r["method"]) for r in blocked["records"]] == \
        [(q, m) for m in ("ar", "s3d", "skip") for q, turns in ((1, 2), (2, 1), (3, 1)) for _ in range(turns)]
    key = lambda r: (r["method"], r["question_id"], r["turn"])  # noqa: E731
    assert {key(r): r["tokens"] for r in mixed["records"]} == {key(r): r["tokens"] for r in blocked["records"]}
    assert mixed["mismatches"] == [] and {f["matches_ar"] for f in mixed["summary"].values()} == {4}
    assert len({f["peak_memory_gib"] for f in mixed["summary"].values()}) == 1  # one peak: all methods' together


def test_rounds_repeat_the_evaluation_and_give_each_round_its_speedup(tiny_checkpoint, prompts, tmp_path, capsys):
    """--rounds 3: every row answered by every method in each round, the same answers each time; each round's
    speedup from that round's records alone, and their median; the tables over all rounds."""
    result = bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--limit", "5",
                        "--methods", "ar", "skip", "--skip", "1:3", "--gamma", "2", "--interleave", "--rounds", "3")
    records = result["records"]
    assert [r["round"] for r in records] == [k for k in range(3) for _ in range(2 * 4)]  # 4 turns, 2 methods
    key = lambda r: (r["method"], r["question_id"], r["turn"])  # noqa: E731
    rounds = [{key(r): r["tokens"] for r in records if r["round"] == k} for k in range(3)]
    assert rounds[0] == rounds[1] == rounds[2] and len(rounds[0]) == 8
    skip = result["summary"]["skip"]

    def rate(method, k):
        mine = [r for r in records if r["method"] == method and r["round"] == k]
        return sum(r["new_tokens"] - 1 for r in mine) / sum(r["decode_s"] for r in mine)

    by_hand = [rate("skip", k) / rate("ar", k) for k in range(3)]
    assert skip["round_speedups"] == pytest.approx(by_hand) and skip["median_speedup"] == pytest.approx(sorted(by_hand)[1])
    assert skip["round_tokens_per_s"] == pytest.approx([rate("skip", k) for k in range(3)])
    assert result["summary"]["ar"]["round_speedups"] == pytest.approx([1.0] * 3)
    assert skip["answers"] == 12 and skip["matches_ar"] == 12 and result["mismatches"] == []
    out = capsys.readouterr().out
    assert "(4 turns, at most 5 per category)" in out and "3 rounds (every figure below is of all of them)" in out
    for k in range(3):
        assert f"| {k + 1} | {rate('ar', k):.1f} | {rate('skip', k):.1f}, {by_hand[k]:.2f}x |" in out
    assert f"| median |  | **{sorted(by_hand)[1]:.2f}x** |" in out


class OurARAsLlamaCpp:
    """Stands in for llama.cpp (optional, `make peers`; test_peers.py runs the real one): llama-cpp-python's
    reset() and generate(), answering with our own AR tokens, and noting how bench.py calls it."""

    def __init__(self, folder):
        self.model, _ = bench.cli.load(folder, torch.device("cpu"), torch.float32)
        self.resets, self.calls = 0, []

    def reset(self):
        self.resets += 1

    def generate(self, prompt, **sampling):
        self.calls.append(sampling)
        yield from s3d.ar_generate(self.model, prompt, 64).tokens


def test_llama_cpp_answers_the_same_prompts_beside_us(tiny_checkpoint, prompts, tmp_path, monkeypatch, capsys):
    """--methods llama.cpp: answered, timed and compared with AR like every method, its prompt's cache never reused,
    greedy with its other samplers off; the table says what each of our methods runs at against it."""
    engines = []

    def llama_cpp_model(source, dtype_name, n_ctx, folder):
        assert (source, dtype_name) == (gguf, "float32") and folder.is_dir()
        engines.append(OurARAsLlamaCpp(tiny_checkpoint))
        return engines[-1]

    gguf = tmp_path / "tiny.gguf"
    gguf.touch()
    monkeypatch.setattr(bench.peers, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(bench.peers, "llama_cpp_model", llama_cpp_model)
    result = bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--limit", "5",
                        "--methods", "llama.cpp", "ar", "s3d", "--gguf", str(gguf), "--dtype", "float32")
    assert list(result["summary"]) == ["ar", "s3d", "llama.cpp"]
    (llm,) = engines
    assert llm.resets == 1 + 4  # the warm-up, then every turn from an empty cache
    assert llm.calls == [{"temp": 0.0, "min_p": 0.0}] * 5
    answers = [r for r in result["records"] if r["method"] == "llama.cpp"]
    assert len(answers) == 4
    assert all(r["matches_ar"] and 1 <= r["new_tokens"] <= 6 and r["decode_s"] > 0 for r in answers)
    out = capsys.readouterr().out
    assert "| llama.cpp F32 | 1.00 | - |" in out
    rate = {m: f["tokens_per_s"] for m, f in result["summary"].items()}
    assert (f"Against llama.cpp F32's tokens/s on the same prompts: ar (ours, eager) {rate['ar'] / rate['llama.cpp']:.2f}x, "
            f"s3d untrained 1:3 {rate['s3d'] / rate['llama.cpp']:.2f}x") in out


def test_llama_cpp_needs_the_engine_the_gguf_and_weights_it_has_on_the_cpu(tiny_checkpoint, tmp_path,
                                                                                     monkeypatch, capsys):
    gguf = tmp_path / "tiny.gguf"
    gguf.touch()
    cases = [(False, (), "--methods llama.cpp needs llama-cpp-python: make peers"),
             (True, (), "--methods llama.cpp needs the GGUF this checkpoint was converted from: give it with --gguf"),
             (True, ("--gguf", str(gguf), "--dtype", "float16"), "runs our weights in float32 or bfloat16, or"),
             (True, ("--gguf", str(gguf), "--quantize", "int8"), "runs our weights in float32 or bfloat16, or"),
             (True, ("--gguf", str(gguf), "--quantize", "w8a8", "--dtype", "float32"), "or --quantize w8a8 (as Q8_0)")]
    for available, args, pattern in cases:
        monkeypatch.setattr(bench.peers, "llama_cpp_available", lambda: available)
        with pytest.raises(SystemExit) as exit:
            bench.parse_args(["--checkpoint", str(tiny_checkpoint), "--methods", "ar", "llama.cpp", *args])
        assert exit.value.code == 2 and pattern in capsys.readouterr().err.strip().splitlines()[-1]
    bench.parse_args(["--checkpoint", str(tiny_checkpoint), "--methods", "ar", "llama.cpp", "--gguf", str(gguf)])
    bench.parse_args(["--checkpoint", str(tiny_checkpoint), "--methods", "ar", "llama.cpp", "--gguf", str(gguf),
                      "--quantize", "w8a8"])


def test_interleaved_profile_runs_ar_beside_every_point(tiny_checkpoint, prompts, tmp_path, monkeypatch):
    calls = []
    ar_generate = s3d.ar_generate
    monkeypatch.setattr(s3d, "ar_generate", lambda *a, **k: calls.append(1) or ar_generate(*a, **k))
    common = ["--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--profile", "--draft", "skip",
              "--skips", "1:2", "--gammas", "1", "2", "--force"]
    once = bench_json(tmp_path, *common)
    runs_once = len(calls)
    beside = bench_json(tmp_path, *common, "--interleave")
    assert runs_once == 1 + 3  # a warm-up and the 3 turns of --limit 1, once
    assert len(calls) - runs_once == 2 * (1 + 3)  # the same beside each of the 2 points
    assert [p["tau"] for p in beside["points"]] == [p["tau"] for p in once["points"]]
    assert all(p["matches_ar"] == p["answers"] == 3 for p in beside["points"])


def test_profile_predicts_with_the_speed_model_and_plots(tiny_checkpoint, prompts, tmp_path, monkeypatch):
    positions, grad_modes = [], set()
    step_calls = bench.roofline.step_calls

    def calls_noting_grad_mode(model, draft, compile, pos):  # (autograd on would compile the steps anew, and fails
        positions.append(pos)                                # to compile model.gemv's)
        calls = step_calls(model, draft, compile, pos)
        return {name: lambda call=call: grad_modes.add(torch.is_grad_enabled()) or call() for name, call in calls.items()}

    monkeypatch.setattr(bench.roofline, "step_calls", calls_noting_grad_mode)
    png = tmp_path / "sweep.png"
    result = bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--sweep",
                        "--draft", "skip", "--skips", "1:2", "1:3", "--gammas", "1", "2", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grad_modes == {False}  # every step was warmed and timed without autograd, as decoding runs it
    points = result["points"]
    assert {(tuple(p["skip"]), p["gamma"]) for p in points} == {((1, 2), 1), ((1, 2), 2), ((1, 3), 1), ((1, 3), 2)}
    for p in points:
        assert p["cd"] == pytest.approx(p["step_ms"]["draft"] / p["step_ms"]["ar"])
        assert p["predicted_speedup"] == pytest.approx(s3d.predicted_speedup(p["acceptance"], p["cd"], p["cv"]))
        assert p["matches_ar"] == p["answers"] == 3  # --limit 1: 2 rows, 3 turns
    # the steps are timed where the answers were decoded (the same answers as an evaluation's), not at a fixed position
    answers = bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--methods", "ar",
                         "skip", "--skip", "1:2", "--gamma", "1", "--force")["records"]
    assert positions == [p["position"] for p in points] == [bench.decoding_position(answers, "skip")] * 4
    assert result["best"] == max(points, key=lambda p: p["measured_speedup"])


def test_the_speed_model_times_the_steps_at_the_middle_of_the_answers():
    records = [{"method": "s3d", "prompt_tokens": 100, "new_tokens": 20}, {"method": "ar", "prompt_tokens": 5000,
               "new_tokens": 1}, {"method": "s3d", "prompt_tokens": 300, "new_tokens": 7},
               {"method": "s3d", "prompt_tokens": 800, "new_tokens": 128}]
    assert bench.decoding_position(records, "s3d") == 303  # the median of 110, 303 and 864; AR's answers do not count


def test_sweep_of_trees_predicts_the_smaller_ones_from_the_biggest(tiny_checkpoint, prompts, tmp_path):
    from checkpoint import load_model
    from heads import new_heads

    heads = new_heads(load_model(tiny_checkpoint), (1, 3), 2, 4)
    with torch.no_grad():  # trained-looking: non-zero adapters and mask embeddings
        for p in heads.parameters():
            p.normal_(0, 0.05)
    heads.save(tmp_path / "heads.safetensors")
    result = bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--sweep",
                        "--heads", str(tmp_path / "heads.safetensors"), "--gammas", "2", "--trees", "2,1", "3,2",
                        "0,1,02", "--best_trees", "3", "--dtype", "float32")
    points = result["points"]
    best_3 = s3d.parse_tree(points[1]["tree"])  # the 3 nodes of the biggest tree with the highest rates, next
    assert [(p["tree"], p["nodes"]) for p in points] == [("3,2", 9), (str(best_3), 3), ("2,1", 4), ("0,1,02", 3),
                                                         (None, 2)]
    assert set(best_3.nodes) <= set(s3d.top_k_tree((3, 2)).nodes)
    assert points[1]["predicted_tau"] >= points[4]["predicted_tau"]  # (the chain's 2 nodes are a smaller choice)
    assert points[0]["predicted_tau"] == points[0]["tau"]
    # 0,1,02 has a node (the third candidate after the first) that 3,2 lacks: it predicts its own tau, as the first
    assert points[3]["predicted_tau"] == points[3]["tau"]
    for p in points:
        assert p["predicted_speedup"] == pytest.approx(p["predicted_tau"] / (p["cd"] + p["cv"]))
        assert p["matches_ar"] == p["answers"] == 3
    # the smaller trees' nodes are some of the biggest's: their predicted tau sums some of its node rates
    assert 1 <= points[4]["predicted_tau"] <= points[2]["predicted_tau"] <= points[0]["tau"]
    best = result["best"]
    assert best == max(points, key=lambda p: p["measured_speedup"])


def test_profile_table_names_the_heads_file_of_each_row_when_there_are_several(capsys):
    point = {"draft": "s3d", "skip": [1, 3], "skipped_layers": 2, "gamma": 2, "tree": None, "nodes": 2, "position": 40,
             "cd": 0.5, "cv": 1.1, "step_ms": {"ar": 10.0}, "acceptance": [0.6, 0.3], "tau": 1.78, "predicted_tau": 1.78,
             "predicted_speedup": 1.1, "measured_speedup": 1.0, "matches_ar": 3, "ties": 0, "answers": 3}
    args = argparse.Namespace(draft="s3d", limit=1, categories=None, max_new_tokens=8, dtype="float32", compile=False,
                              interleave=False, temperature=0.0, trees=[])
    tables = []
    for files in (["runs/a.safetensors"], ["runs/a.safetensors", "heads/b.safetensors"]):
        bench.print_profile([{**point, "heads": f} for f in files], args, 2)
        tables.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("|")])
    one, two = tables
    assert one[0].startswith("| skip |") and "a.safetensors" not in "".join(one)
    assert two[0].startswith("| heads | skip |") and [row.split(" | ")[0] for row in two[2:]] == \
        ["| a.safetensors", "| b.safetensors"]
    assert {row.count("|") for row in one} == {12} and {row.count("|") for row in two} == {13}


def test_sampled_tables_say_so_and_do_not_compare_answers_with_ar(capsys):
    """Sampled, a speculative answer is drawn from AR's distribution, not AR's answer token for token: the tables say
    'temperature T' where they said 'greedy', and '- (sampled)' in the 'output == AR' column, not '0/3'."""
    point = {"draft": "s3d", "skip": [1, 3], "skipped_layers": 2, "gamma": 2, "tree": "2,1", "nodes": 4, "position": 40,
             "cd": 0.5, "cv": 1.1, "step_ms": {"ar": 10.0}, "acceptance": [0.6, 0.3], "tau": 1.78, "predicted_tau": 1.78,
             "predicted_speedup": 1.1, "measured_speedup": 1.0, "matches_ar": 0, "ties": 0, "answers": 3,
             "heads": None}
    figures = {"tau": 1.78, "acceptance": [0.6, 0.3], "tokens_per_s": 50.0, "speedup": 1.2, "matches_ar": 0,
               "answers": 3, "ties": 0}
    for temperature, header, column in ((0.0, "8 new tokens, greedy,", "| 0/3 |"),
                                        (0.7, "8 new tokens, temperature 0.7 (the points after", "| - (sampled) |")):
        args = argparse.Namespace(draft="s3d", limit=1, categories=None, max_new_tokens=8, dtype="float32",
                                  compile=False, interleave=False, temperature=temperature, trees=[s3d.top_k_tree((2, 1))])
        bench.print_profile([point], args, 2)
        out = capsys.readouterr().out
        assert header in out and out.strip().splitlines()[-1].endswith(column)
        assert bench.table_row("s3d", figures, args).endswith(column)


def test_speed_model_by_hand():
    # a = (0.8, 0.5): E[tau] = 1 + 0.8 + 0.4 = 2.2; costs 0.3 + 1.1 = 1.4 -> 1.5714...
    assert s3d.predicted_speedup([0.8, 0.5], 0.3, 1.1) == pytest.approx(2.2 / 1.4)


@pytest.mark.parametrize("args,pattern", [
    (("--methods", "s3d"), "--methods needs ar"),
    (("--plot", "x.png"), "--plot goes with --profile or --sweep"),
    (("--limit", "0"), "must be at least 1"),
    (("--prompts", "README.md"), "not a Spec-Bench row"),
    (("--methods", "ar", "model"), "the model draft needs --draft_checkpoint"),
    (("--json", "data/spec_bench_dev.jsonl"), "--json data/spec_bench_dev.jsonl is also an input of this run"),
    (("--json", "README.md"), "--json README.md exists: pass --force to replace it"),
    (("--prompts", "no-such.jsonl"), "cannot read --prompts no-such.jsonl: No such file or directory"),
    (("--device", "tpu"), "unknown device 'tpu'"),
    (("--top_p", "1.5"), "--top_p must be in (0, 1]"),
    (("--temperature", "inf"), "--temperature must be a number >= 0, got inf"),
    (("--skip", "40:50"), "invalid skip range 40:50 for a model of 30 layers"),
    (("--tree", "2,1", "--gamma", "3"), "drop --gamma 3"),
    (("--tree", "2,1", "--methods", "ar", "skip"), "--tree goes with --methods s3d"),
    (("--trees", "2,1"), "--trees goes with --profile or --sweep of the s3d draft"),
    (("--sweep", "--trees", "2,1,1"), "as deep as a g of --gammas (2 4)"),
    (("--sweep", "--best_trees", "3"), "--best_trees chooses trees inside the biggest of --trees: add --trees"),
    (("--roofline", "--trees", "2,1", "--best_trees", "3"), "--best_trees goes with --profile or --sweep"),
    (("--sweep", "--trees", "2,1", "--best_trees", "2", "4"), "--best_trees 4: the best trees are chosen inside the "
                                                              "biggest of --trees, which has 4 nodes: give fewer"),
    (("--tree", "0,11"), "must include every prefix of each"),
    (("--tree", "2,x"), "--tree takes candidates per depth"),
    (("--decode", "--interleave"), "--interleave goes with the evaluation, --profile/--sweep and --formats"),
    (("--roofline", "--categories", "qa"), "--categories goes with the evaluation, --profile/--sweep and --formats"),
    (("--categories", "qa", "poetry"), "--categories poetry: not in data/spec_bench_dev.jsonl"),
    (("--gamma", "0"), "must be at least 1"),
    (("--lookup", "1"), "--lookup matches 2 tokens or more, not 1"),
    (("--methods", "ar", "s3d", "lookup", "--tree", "2,1"), "--methods lookup copies a chain of drafts"),
    (("--decode", "--gguf", "no-such.gguf"), "--gguf no-such.gguf: no such file"),
    (("--decode", "--repeats", "0"), "must be at least 1"),
    (("--interleave", "--rounds", "0"), "must be at least 1"),
    (("--rounds", "2"), "--rounds goes with the evaluation (--methods), --interleave"),
    (("--profile", "--interleave", "--rounds", "2"), "--rounds goes with the evaluation (--methods), --interleave"),
    (("--roofline", "--context", "0"), "must be at least 1"),
    (("--roofline", "--context", "100000"), "--context 100000 does not fit the model's context of 8192 tokens"),
    (("--random_weights", "tiny", "--context", "5000"), "--context 5000 does not fit tiny's context of 1024 tokens"),
])
def test_bad_arguments(args, pattern, default_checkpoint):
    assert_one_line_error(pattern, *args)


def assert_one_line_error(pattern: str, *args: str) -> str:
    """bench.py with args exits 2, without a traceback, its last line holding pattern; returns that line."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--no-compile", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert pattern in last
    return last


def test_weight_formats_table(tiny_checkpoint, prompts, tmp_path, capsys):
    """--formats: one row per format from one command; int8 shrinks the weights, S3D stays equal to AR."""
    from checkpoint import load_model
    from heads import new_heads

    heads = tmp_path / "heads.safetensors"
    new_heads(load_model(tiny_checkpoint), (1, 3), 3, 4).save(heads)
    result = bench_json(tmp_path, "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts), "--formats", "float32",
                        "int8", "--dtype", "float32", "--heads", str(heads), "--gamma", "3")
    none, int8 = result["formats"]
    # each format in a fresh process, so that its peak memory holds nothing of the formats before it
    assert len({none["process"], int8["process"], os.getpid()}) == 3
    assert (none["format"], int8["format"]) == ("float32", "int8 (float32 activations)")
    assert int8["memory_bytes"]["weights"] < none["memory_bytes"]["weights"]
    for row in (none, int8):
        assert row["perplexity"] > 1 and row["s3d"]["matches_ar"] == row["s3d"]["answers"] == 3
        assert row["ar"]["peak_memory_gib"] > 0 and row["s3d"]["tau"] >= 1
    table = capsys.readouterr().out
    assert "| float32 |" in table and "| int8 (float32 activations) |" in table


def test_random_weights_table_on_the_cpu(tmp_path, capsys):
    """--random_weights with the suite's small shape: every step of every format timed, with the bandwidth the AR
    step achieves and a predicted speedup per acceptance rate that grows with the rate."""
    result = bench_json(tmp_path, "--random_weights", "tiny", "--device", "cpu", "--formats", "bfloat16", "float32",
                        "--gammas", "2", "3", "--context", "32")
    assert [r["format"] for r in result["formats"]] == ["bfloat16", "float32"]
    for r in result["formats"]:
        assert set(r["ms"]) == {"ar", "verify3", "verify4", "draft2 2:4", "draft3 2:4"}
        assert all(ms > 0 for ms in r["ms"].values()) and r["gb_s"] > 0
        assert all(p == sorted(p) for p in r["predicted"].values())
    assert "| bfloat16 |" in capsys.readouterr().out


def test_roofline_rows_of_every_draft_variant(monkeypatch):
    """roofline.measure_steps on a tiny model: AR, verify and each draft variant compiled and timed; the draft
    vocabulary reads only its rows of the output head, folded adapters add no bytes, int8 copies read a quarter;
    the floor is at the median of the bandwidths read once a round, between the steps."""
    import torch
    import torch._inductor.config as inductor

    import roofline
    from heads import new_heads

    model = roofline.random_model("tiny", torch.device("cpu"), torch.float32)
    s3d.prepare_cache(model, 64)
    given = new_heads(model, (2, 4), 3, 4, torch.arange(128))
    heads = [(given, True, False), (new_heads(model, (2, 4), 3, 4, torch.arange(128)), False, False),
             (new_heads(model, (2, 4), 3, 4), True, False), (new_heads(model, (2, 4), 3, 4), True, True)]
    reads, steps_before_read = iter([10.0, 30.0, 20.0]), []
    timed_calls = []

    def read_bandwidth(buffer, repeats):  # a drifting bandwidth; records the steps timed before each read
        assert buffer.numel() * 4 >= 256 * 2**20
        steps_before_read.append(len(timed_calls))
        return next(reads)

    monkeypatch.setattr(roofline, "read_bandwidth", read_bandwidth)
    timed = roofline.median_ms
    monkeypatch.setattr(roofline, "median_ms", lambda call, *a, **k: (timed_calls.append(1), timed(call, *a, **k))[1])
    try:
        with inductor.patch({"cpp.enable_kernel_profile": True}):
            rows, bandwidth = roofline.measure_steps(model, heads, 32, rounds=3, per_round=2,
                                                     trees=[s3d.parse_tree("0,1,00,000")])
            ar = roofline.step_calls(model, s3d.Draft("s3d", 3, (2, 4)), True, 32)["ar"]
            with torch.no_grad():  # (as measure_steps calls the steps)
                for wall_ms in (1e-3, 1e3):  # the profiled calls' shares split the step's timed ms, whatever they took
                    parts, _ = roofline.breakdown(ar, wall_ms, (model.config.vocab_size,))
                    assert sum(parts.values()) == pytest.approx(wall_ms) and parts["linear maps"] > wall_ms / 100
    finally:
        s3d.release_compiled()
    assert bandwidth == 20.0
    assert all(r["floor_ms"] == pytest.approx(sum(r["bytes"].values()) / 20.0 / 1e6) for r in rows)
    assert steps_before_read == [0, 14, 28]  # one read a round, each before its round's 7 steps x 2 calls
    tree_verify = rows.pop(2)  # (a sparse tree of 4 nodes: its verify step has 5 rows)
    assert tree_verify["step"] == "verify (tree 0,1,00,000, 5 tokens)" and tree_verify["ms"] > 0
    assert tree_verify["gemm_calls"] == rows[1]["gemm_calls"] and tree_verify["bytes"]["linear"] == rows[1]["bytes"]["linear"]
    assert [r["step"] for r in rows] == [
        "AR step (1 token)", "verify (4 tokens)",
        "draft (3 tokens, 4 of 6 layers, rank 4, adapters folded, draft vocabulary 128)",
        "draft (3 tokens, 4 of 6 layers, rank 4, draft vocabulary 128)",
        "draft (3 tokens, 4 of 6 layers, rank 4, adapters folded)",
        "draft (3 tokens, 4 of 6 layers, rank 4, adapters folded into int8 copies)"]
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    for r in rows:  # the parts add up to the step, and each part's floor is its bytes' at the bandwidth
        assert sum(r["parts_ms"].values()) == pytest.approx(r["ms"])
        floors, moved = r["parts_floor_ms"], r["bytes"]
        assert floors["linear maps"] == pytest.approx((moved["linear"] + moved["adapters"]) / 20.0 / 1e6)
        assert floors["output head"] == pytest.approx(moved["head"] / 20.0 / 1e6)
        assert floors["attention"] == pytest.approx(moved["kv_cache"] / 20.0 / 1e6)
        assert floors["other kernels"] == floors["outside kernels"] == 0
        assert sum(floors.values()) == pytest.approx(r["floor_ms"])
    full_head = rows[0]["bytes"]["head"]
    assert [r["bytes"]["head"] for r in rows[2:]] == [full_head // 4, full_head // 4, full_head, full_head]
    assert rows[2]["bytes"]["adapters"] == 0 < rows[3]["bytes"]["adapters"] and rows[5]["bytes"]["adapters"] == 0
    # int8 copies: a byte a weight (and a scale a row) against float32's four
    assert rows[4]["bytes"]["linear"] / 4 < rows[5]["bytes"]["linear"] < rows[4]["bytes"]["linear"] / 3
    # as many GEMM calls in verify as in the AR step, fewer in a draft of 4 of the 6 layers, more with its adapters
    # not folded into the weights (the tiny float32 model lets Inductor write some maps as its own kernels: how many
    # depends on its choices, so the counts are compared, not fixed)
    calls = [r["gemm_calls"] for r in rows]
    assert calls[0] == calls[1] > calls[2] > 0 and calls[3] > calls[2] and calls[4] < calls[0]
    assert 0 < roofline.linear_call_us(torch.float32, torch.device("cpu"), calls=20) < 1000


def test_a_prompt_longer_than_the_context_is_refused_before_the_run(tmp_path, default_checkpoint):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"question_id": 7, "category": "qa", "turns": ["word " * 9000]}) + "\n")
    error = assert_one_line_error("exceeds the model's context of 8192", "--methods", "ar", "--prompts", str(prompts))
    assert "question 7 of" in error


def test_each_step_is_timed_after_the_one_before_it_in_the_loop():
    """roofline.loop_ms (bench.py --profile's step costs) times the AR step after itself, verify after a draft and a
    draft after verify, as the decoding loops run them: every call of a step, warm-up and timed, comes right after
    a call of the one before it (a draft timed after itself finds part of its weights still in cache)."""
    import roofline

    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("ar", "draft", "verify")}
    ms = roofline.loop_ms(calls, repeats=3)
    assert set(ms) == {"ar", "draft", "verify"} and all(v >= 0 for v in ms.values())
    assert log == ["ar", "ar"] * 5 + ["verify", "draft"] * 5 + ["draft", "verify"] * 5
    log.clear()  # only the steps named (--random_weights times the AR step once), still each after its predecessor
    assert set(roofline.loop_ms(calls, repeats=1, names=["draft"])) == {"draft"}
    assert log == ["verify", "draft"] * 3


def test_a_sweeps_step_costs_are_timed_in_rounds_over_its_points(monkeypatch):
    """bench.py --profile/--sweep times every point's steps after all have run, in rounds that take each point in
    turn with its heads attached: a slow spell of the machine then hits all points alike. Each cost is the median of
    its rounds."""
    import roofline

    model = torch.nn.Module()
    model.heads = None
    log, values = [], iter(range(1000))

    def loop_ms(calls, repeats=20, names=None):  # each call of a point's steps: which point, with which heads
        log.append((calls["point"], model.heads))
        return {"ar": 1.0, "draft": float(next(values)), "verify": 2.0}

    monkeypatch.setattr(roofline, "loop_ms", loop_ms)
    points = [("heads a", {"point": 0}), (None, {"point": 1}), ("heads b", {"point": 2})]
    costs = roofline.costs_in_rounds(model, points, rounds=3)
    assert log == [(0, "heads a"), (1, None), (2, "heads b")] * 3
    # point 0's drafts took 0, 3 and 6 (its rounds' values), point 1's 1, 4 and 7, point 2's 2, 5 and 8
    assert [c["draft"] for c in costs] == [3.0, 4.0, 5.0]
    assert all(c["ar"] == 1.0 and c["verify"] == 2.0 for c in costs)
