"""examples/walkthrough.py runs on the embedded default and decides exactly what generate.py --show_drafts shows."""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = os.path.join(ROOT, "heads", "smollm2-135m-instruct.safetensors")
PROMPT = "Name three prime numbers."


def run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_walkthrough_agrees_with_generate(default_checkpoint):
    walk = run("examples/walkthrough.py", "--prompt", PROMPT, "--iterations", "3")
    # (on a CPU without native bf16 --adaptive is on by default, AR steps coming first, and g is 3)
    shown = run("generate.py", "--prompt", PROMPT, "--s3d", HEADS, "--show_drafts", "--max_new_tokens", "24",
                "--no-adaptive", "--gamma", "4")

    for step in ("1. Prefill", "2. Draft", "3. Verify", "4. Accept", "5. Advance"):
        assert step in walk
    # g draft positions over the shipped heads' draft vocabulary, g + 1 verified over the whole vocabulary
    assert "logits (4, 16384)" in walk and "logits (5, 49152)" in walk
    walk_accepted = [int(n) for n in re.findall(r"accepted (\d+) of 4", walk)]
    shown_accepted = [int(n) for n in re.findall(r"^ *\d+  (\d+)/4  ", shown, re.M)]
    assert len(walk_accepted) == 3 and walk_accepted == shown_accepted[:3]
    text_so_far = ast.literal_eval(re.search(r"^text so far: (.*)$", walk, re.M)[1])
    answer = shown.split("\n\n")[1]  # --show_drafts prints the iterations, then the text, then the histogram
    assert len(text_so_far) > 3 and answer.startswith(text_so_far)


def test_bad_iterations_are_one_line_errors(default_checkpoint):
    for value, message in (("0", "--iterations must be at least 1"), ("100000", "exceed the model's context of 8192")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "walkthrough.py"), "--iterations", value],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert message in proc.stderr.strip().splitlines()[-1]
