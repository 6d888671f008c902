"""Every command README shows is valid as written: each `python SCRIPT.py ...` (or torchrun ... SCRIPT.py ...)
line of its bash blocks goes through that script's own flag parsing with README's placeholders filled in (DIR, a
dataset root, RUN folders, $J/$F/$D from the block that sets them); the commands that need no data (synthetic)
also run, with tiny settings appended (argparse keeps the last value of a flag)."""
import os, re, shlex

import pytest

from conftest import ROOT, run_cli
import common

README = os.path.join(ROOT, "README.md")
SCRIPTS = {"common.py", "logo.py", "co_ssl.py", "contrastive_crop.py", "leoclr.py", "clim.py", "linear_eval.py"}
TINY_RUN = ["--subset", "64", "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--knn-every", "0",
            "--gpus", "0", "--workers", "0"]


def readme_commands():
    """(script, argv) of every script command in README's bash blocks, shell variables of the block expanded."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", open(README).read(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)                       # join continued lines
        env = dict(re.findall(r'^(\w+)="([^"]*)"', text, re.M))     # J="...", D="...", F="..."
        for line in text.splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            for k, v in env.items():
                line = line.replace(f"${k}", v)
            if not re.match(r"^(\w+=\S+\s+)*(python|torchrun)\s", line) or re.match(r"^python\s+-c", line):
                continue
            words = shlex.split(line)
            words = [w for w in words if not re.match(r"^\w+=", w)]   # OMP_NUM_THREADS=1 ...
            script = next((w for w in words if w in SCRIPTS), None)
            if words and words[0] in ("python", "torchrun") and script and "-c" not in words[:2]:
                out.append((script, words[words.index(script) + 1:]))
    return out


COMMANDS = readme_commands()


def fill(argv, tmp):
    """README placeholders -> paths that exist here (parsing checks flags, not data)."""
    subs = {"DIR": tmp, "./data": tmp, "/path/to/root": tmp, "/path/to/imagenet": tmp, "/datasets/imagenet": tmp,
            "RUN": tmp, "imagenet100.txt": os.path.join(tmp, "classes.txt"),
            "1percent.txt": os.path.join(tmp, "labels.txt")}
    return [subs.get(a, a) for a in argv]


def test_readme_has_commands_of_every_script():
    assert {s for s, _ in COMMANDS} == SCRIPTS and len(COMMANDS) > 60


@pytest.mark.parametrize("script,argv", COMMANDS, ids=[f"{s} {' '.join(a)}"[:90] for s, a in COMMANDS])
def test_readme_command_parses(script, argv, tmp_path):
    """The flags and their combination are accepted by the script's parser (no data is read)."""
    argv = fill(argv, str(tmp_path))
    if script == "common.py":
        common.parse_base(argv)
    else:
        import importlib
        importlib.import_module(script[:-3]).parse(argv)


RUNNABLE = [(s, a) for s, a in COMMANDS if "synthetic" in a and s != "linear_eval.py"]


@pytest.mark.parametrize("script,argv", RUNNABLE, ids=[f"{s} {' '.join(a)}"[:90] for s, a in RUNNABLE])
def test_readme_synthetic_command_runs(script, argv, tmp_path):
    r = run_cli(script, *argv, *TINY_RUN, "--out", tmp_path / "run")
    assert r.rc == 0, r.err[-2000:]
    assert r.json["steps"] == 2
