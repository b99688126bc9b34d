"""demo.sh, every mode, with `python` replaced by a stand-in that parses each command line with
the script's own get_args (an unknown or misspelt flag exits 2 and stops the demo) and leaves the
files the next line reads. Nothing is trained: this checks the demo's commands, not its numbers."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAND_IN = """
import importlib, json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
script, argv = sys.argv[1], sys.argv[2:]
args = importlib.import_module(Path(script).stem).get_args(argv)
with open({log!r}, "a") as f:
    f.write(json.dumps([script] + argv) + "\\n")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
if script == "data.py":
    (out / "manifest.jsonl").write_text("")
for name in ("model.safetensors", "train.jsonl"):
    (out / name).write_text("")
(out / "table.md").write_text("- ipro vs base, FaceSim paired per clip: stand-in")
print("reproduced: stand-in")
"""


@pytest.fixture
def demo_dir(tmp_path):
    """A copy of demo.sh in a folder of its own (it cds there and writes assets/), and a `python`
    first on PATH that runs the stand-in."""
    root = tmp_path / "repo"
    (root / "assets").mkdir(parents=True)
    shutil.copy(REPO / "demo.sh", root / "demo.sh")
    log = tmp_path / "commands.jsonl"
    (tmp_path / "stand_in.py").write_text(STAND_IN.format(repo=str(REPO), log=str(log)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "stand_in.py"}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return root, log, env


def run_demo(demo_dir, *mode):
    root, log, env = demo_dir
    done = subprocess.run(["bash", "demo.sh", *mode, "runs/x"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_every_demo_mode_runs_commands_that_the_scripts_accept(demo_dir):
    cmds = run_demo(demo_dir)
    assert [c[0] for c in cmds] == ["data.py", "train.py", "eval.py", "eval.py"]
    assert "--reference" in cmds[2] and cmds[3][cmds[3].index("--split") + 1] == "train"

    cmds = run_demo(demo_dir, "ablations")      # the demo's IPRO run is reused, not trained again
    trained = [" ".join(c) for c in cmds[4:] if c[0] == "train.py"]
    for flag in ("--kl-weight 0", "--score first", "--grad-window high", "--method sft"):
        assert sum(flag in c for c in trained) == 1, flag
    assert sum(c[0] == "eval.py" for c in cmds[4:]) == 2

    cmds = run_demo(demo_dir, "sweep")          # ipro and no_kl exist: only the two new balances train
    new = [c for c in cmds if c[0] == "train.py"][-2:]
    assert {"--reward-scale", "--kl-weight"} == {f for c in new for f in c if f in ("--reward-scale", "--kl-weight")}
    last = cmds[-1]
    assert last[0] == "eval.py" and last[last.index("--split") + 1] == "train"  # never the held-out people

    cmds = run_demo(demo_dir, "base")
    assert cmds[-1][cmds[-1].index("--method") + 1] == "sft"
    assert (demo_dir[0] / "assets/tiny_base.safetensors").exists()


def test_a_misspelt_flag_stops_the_demo(demo_dir):
    root, log, env = demo_dir
    text = (root / "demo.sh").read_text()
    (root / "demo.sh").write_text(text.replace("--save-every 0", "--save-evry 0"))
    done = subprocess.run(["bash", "demo.sh", "runs/x"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "--save-evry" in done.stderr
