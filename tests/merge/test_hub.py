"""Hub pull and push through the real huggingface_hub client, against a loopback server (fake_hub.py)
or a pre-filled cache, never the network. Each CLI call runs in a subprocess because huggingface_hub
reads HF_ENDPOINT and HF_HOME when it is imported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub

from cpift.merge import methods

TOKENIZER = {"tokenizer.model": b"spm", "merges.txt": b"#version: 0.2\n", "chat_template.jinja": b"{{ x }}"}
ALLOWED = {"config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER}


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def hub_env(tmp_path: Path, hub: FakeHub | None, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN="hf_loopback_test_token",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9")  # port 9: nothing listens
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def cpift_merge(tmp_path: Path, hub: FakeHub | None, *argv, offline: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpift.cli.merge_cli", *map(str, argv)],
                          env=hub_env(tmp_path, hub, offline), capture_output=True, text=True, timeout=300)


_EACH = """
import contextlib, io, json, sys
from cpift.cli.merge_cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            results.append([argv, e.code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def cpift_merge_each(tmp_path: Path, hub: FakeHub | None, *argvs, offline: bool = False):
    """Several CLI calls in one subprocess (one interpreter start-up), each with its own exit code,
    stdout and stderr, as subprocess.CompletedProcess."""
    run = subprocess.run([sys.executable, "-c", _EACH, json.dumps([[str(a) for a in v] for v in argvs])],
                         env=hub_env(tmp_path, hub, offline), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return [subprocess.CompletedProcess(*item) for item in json.loads(run.stdout.splitlines()[-1])]


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("cpift-merge: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def publish(hub: FakeHub, repo: str, model_dir: Path) -> str:
    """Put a model directory in the fake Hub, plus files a pull must leave behind."""
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    files.update({**TOKENIZER, "README.md": b"# upstream card\n", "pytorch_model.bin": b"not wanted",
                  "optimizer.pt": b"not wanted"})
    return hub.commit(repo, files)


def test_push_uploads_every_file_with_the_card(hub, llama, tmp_path):
    out = tmp_path / "merged"
    methods.ties(llama["base"], [llama["task1"], llama["task2"]], out, density=0.3, max_shard_size="30000",
                 progress=False)
    r = cpift_merge(tmp_path, hub, "push", out, "me/merged", "--private")
    assert r.returncode == 0, r.stderr
    repo = hub.repos["me/merged"]
    commit = repo.branches["main"]
    assert r.stdout.strip() == f"pushed {out} to me/merged: {hub.url}/me/merged/commit/{commit}"
    assert repo.private and repo.messages[commit] == "Upload merged with cpift"
    arrived = hub.files("me/merged")
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".cpift-output"}  # the marker stays local
    assert {k: v for k, v in arrived.items() if k != ".gitattributes"} == local
    assert len([k for k in local if k.endswith(".safetensors")]) > 1
    card = arrived["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    # local inputs: no base_model (the Hub takes repo ids only), and no absolute path in what is published
    assert meta == {"tags": ["cpift", "merge", "mergekit"], "library_name": "transformers"}
    assert hub.validated == [card]
    assert all(str(tmp_path) not in v.decode() and str(llama["base"].parent) not in v.decode()
               for k, v in arrived.items() if k.endswith((".md", ".yml")))
    assert "mergekit_config.yml" in arrived
    assert "method **ties**" in card and "| density | 0.3, 0.3 |" in card
    calls = [c for c in hub.requests if c[0] == "POST"]
    assert calls == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                     ("POST", "/api/models/me/merged/preupload/main"), ("POST", "/api/models/me/merged/commit/main")]


def test_push_to_a_new_branch_of_an_existing_repo(hub, llama, tmp_path):
    out = tmp_path / "m"
    methods.slerp(llama["task1"], llama["task2"], out, t=0.25, progress=False)
    hub.commit("me/m", {"README.md": b"old"})
    r = cpift_merge(tmp_path, hub, "push", out, "me/m", "--revision", "try-1")
    assert r.returncode == 0, r.stderr
    assert hub.files("me/m", "main") == {"README.md": b"old"}
    assert hub.files("me/m", "try-1")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert not hub.repos["me/m"].private


def test_merge_with_push_to_hub(hub, llama, tmp_path):
    out = tmp_path / "m"
    r = cpift_merge(tmp_path, hub, "linear", llama["task1"], llama["task2"], "--weights", "1,3", "-o", out,
                    "--push-to-hub", "me/linear", "--private", "--commit-message", "linear 1:3", "-q")
    assert r.returncode == 0, r.stderr
    repo = hub.repos["me/linear"]
    assert repo.private and repo.messages[repo.branches["main"]] == "linear 1:3"
    assert r.stdout.splitlines()[0].startswith("linear: ")
    assert r.stdout.splitlines()[1].startswith(f"pushed {out} to me/linear: {hub.url}/me/linear/commit/")
    arrived = hub.files("me/linear")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".cpift-output"} == \
        {k: v for k, v in arrived.items() if k != ".gitattributes"}
    assert b"| weights | 1.0, 3.0 |" in arrived["README.md"]


def test_push_to_hub_is_public_by_default_and_options_need_it(hub, llama, tmp_path):
    out = tmp_path / "m"
    r = cpift_merge(tmp_path, hub, "slerp", llama["task1"], llama["task2"], "-o", out, "--push-to-hub", "me/pub", "-q")
    assert r.returncode == 0, r.stderr
    repo = hub.repos["me/pub"]
    assert not repo.private and repo.messages[repo.branches["main"]] == "Upload m with cpift"
    r = cpift_merge(tmp_path, hub, "push", out, "me/pub2", "--commit-message", "by hand")
    assert r.returncode == 0 and hub.repos["me/pub2"].messages[hub.repos["me/pub2"].branches["main"]] == "by hand"
    for flag in (["--private"], ["--commit-message", "x"]):
        r = cpift_merge(tmp_path, hub, "slerp", llama["task1"], llama["task2"], "-o", tmp_path / "n", *flag)
        assert r.returncode == 2 and "only applies with --push-to-hub" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "n").exists()


def test_the_hub_refuses_a_card_with_local_paths(hub, llama, tmp_path):
    """What a card with a local path in base_model (as cpift wrote before) gets from the Hub: 400,
    a one-line error, nothing committed."""
    out = tmp_path / "m"
    methods.slerp(llama["task1"], llama["task2"], out, progress=False)
    text = (out / "README.md").read_text()
    (out / "README.md").write_text(text.replace("---\n", f"---\nbase_model:\n- {llama['task1']}\n", 1))
    r = cpift_merge(tmp_path, hub, "push", out, "me/bad")
    one_line_error(r, "me/bad: the Hub refused the upload", "base_model", "is not a valid model id")
    assert set(hub.files("me/bad")) == {".gitattributes"}
    (out / "README.md").write_text(text.replace("---\n", "---\nbase_model_relation: blend\n", 1))
    one_line_error(cpift_merge(tmp_path, hub, "push", out, "me/bad"), "base_model_relation")


def test_pull_then_merge_hub_models_offline_and_reproduce(hub, llama, tmp_path):
    """pull fetches only what a merge reads into HF_HOME; offline, Hub ids resolve from that cache; the
    card names the repos, the recipe pins their commits and reproduces the output byte for byte, and
    the weights equal a merge of the same models from local directories."""
    commits = {n: publish(hub, f"org/{n}", llama[n]) for n in ("base", "task1")}
    r = cpift_merge(tmp_path, hub, "pull", "org/base")
    assert r.returncode == 0, r.stderr
    snap = Path(r.stdout.strip())
    assert snap == tmp_path / "hf-home" / "hub" / "models--org--base" / "snapshots" / commits["base"]
    shards = {p.name for p in llama["base"].glob("*.safetensors")}
    assert {p.name for p in snap.iterdir()} == ALLOWED | shards
    assert all((snap / n).read_bytes() == TOKENIZER.get(n) or sha(snap / n) == sha(llama["base"] / n)
               for n in ALLOWED | shards)
    assert cpift_merge(tmp_path, hub, "pull", f"org/task1@{commits['task1']}").returncode == 0

    n_requests = len(hub.requests)
    out = tmp_path / "out"
    pull, merge, again = cpift_merge_each(
        tmp_path, hub, ["pull", "org/base@main"],
        ["task-arithmetic", "--base", "org/base", f"org/task1@{commits['task1']}", "--lambda", "0.7", "-o", out, "-q"],
        ["config", out / "cpift_recipe.yml", "-o", tmp_path / "again", "-q"], offline=True)
    assert pull.returncode == 0 and Path(pull.stdout.strip()) == snap, pull.stderr
    assert merge.returncode == 0 and again.returncode == 0, (merge.stderr, again.stderr)
    assert len(hub.requests) == n_requests, "offline runs must not reach the Hub"

    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n- org/base\n- org/task1\nbase_model_relation: merge\n"
                           "tags:\n- cpift\n- merge\n- mergekit\nlibrary_name: transformers\n---\n")
    assert str(tmp_path) not in card
    assert f"| base | `org/base` | {commits['base']} |" in card
    recipe = yaml.safe_load((out / "cpift_recipe.yml").read_text())
    assert recipe["base_model"] == f"org/base@{commits['base']}"
    assert recipe["models"][0]["model"] == f"org/task1@{commits['task1']}"

    assert {p.name: sha(p) for p in out.iterdir()} == {p.name: sha(p) for p in (tmp_path / "again").iterdir()}
    methods.task_arithmetic(llama["base"], [llama["task1"]], tmp_path / "local", lam=0.7, progress=False)
    assert sha(out / "model.safetensors") == sha(tmp_path / "local" / "model.safetensors")
    # the Hub accepts this card: a merge of pulled models pushed back
    r = cpift_merge(tmp_path, hub, "push", out, "me/ta")
    assert r.returncode == 0, r.stderr
    assert hub.files("me/ta")["README.md"] == card.encode()
    mk = yaml.safe_load(hub.files("me/ta")["mergekit_config.yml"])
    assert mk["base_model"] == f"org/base@{commits['base']}" and mk["merge_method"] == "task_arithmetic"


def test_pull_from_a_hand_built_cache_offline(tmp_path, llama):
    """The cache layout the client reads (refs/main → snapshots/<commit> → blobs), filled by hand."""
    commit = "1" * 40
    repo = tmp_path / "hf-home" / "hub" / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for p in llama["task2"].iterdir():
        blob = repo / "blobs" / sha(p)
        blob.write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    r = cpift_merge(tmp_path, None, "pull", "acme/tiny", offline=True)
    assert r.returncode == 0 and Path(r.stdout.strip()) == snap, r.stderr
    r = cpift_merge(tmp_path, None, "slerp", "acme/tiny", llama["task1"], "--t", "0", "-o", tmp_path / "o", "-q",
                    offline=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "README.md").read_text().count(f"`acme/tiny` | {commit} |") == 1


def test_hub_errors_are_one_line(hub, llama, tmp_path):
    publish(hub, "org/base", llama["base"])
    out = tmp_path / "m"
    methods.slerp(llama["task1"], llama["task2"], out, progress=False)
    hub.commit("me/strict", {"README.md": b"old"})
    hub.reject_yaml = '"base_model" is not a valid model id'
    missing, bad_rev, no_dir, with_rev, refused = cpift_merge_each(
        tmp_path, hub, ["pull", "org/missing"], ["pull", "org/base@nope"], ["push", tmp_path / "nope", "me/m"],
        ["push", out, "me/m@dev"], ["push", out, "me/strict"])
    one_line_error(missing, "org/missing: repository not found on the Hub")
    one_line_error(bad_rev, "org/base@nope: revision 'nope' not found")
    one_line_error(no_dir, "nope: not a directory")
    one_line_error(with_rev, "expected a Hub repo id org/name (give a branch with --revision)")
    one_line_error(refused, "me/strict: the Hub refused the upload", "base_model")
    assert hub.files("me/strict") == {"README.md": b"old"}

    pull, merge, push = cpift_merge_each(tmp_path, hub, ["pull", "org/base"],
                                         ["slerp", "org/base", llama["task1"], "-o", tmp_path / "o"],
                                         ["push", out, "me/m"], offline=True)
    one_line_error(pull, "org/base: not in the local Hub cache and offline (HF_HUB_OFFLINE=1)")
    one_line_error(merge, "org/base: not in the local Hub cache")
    assert not (tmp_path / "o").exists()
    one_line_error(push, "me/m: cannot push while offline")

    pull, push = cpift_merge_each(tmp_path, None, ["pull", "org/base"], ["push", out, "me/m"])
    one_line_error(pull, "org/base: not in the local Hub cache and the Hub could not be reached")
    one_line_error(push, "me/m: cannot reach the Hub")


def test_push_publishes_nothing_from_outside_the_folder(hub, llama, tmp_path):
    """A tokenizer.json linked to a file elsewhere is not uploaded; a FIFO does not block."""
    out = tmp_path / "m"
    methods.slerp(llama["task1"], llama["task2"], out, progress=False)
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "do not publish"}')
    (out / "tokenizer.json").symlink_to(secret)
    (tmp_path / "m2").mkdir()
    os.mkfifo(tmp_path / "m2" / "config.json")  # and no README.md: the refusal is still one line
    linked, fifo = cpift_merge_each(tmp_path, hub, ["push", out, "me/m"], ["push", tmp_path / "m2", "me/m2"])
    one_line_error(linked, "tokenizer.json", "outside")
    one_line_error(fifo, "config.json", "FIFO")
    assert "me/m" not in hub.repos and "me/m2" not in hub.repos


def test_push_never_uploads_the_marker_nor_a_partial_directory(hub, llama, tmp_path):
    """cpift's bookkeeping stays local; a partial output (resume journal, hidden build dir) is refused."""
    out = tmp_path / "m"
    methods.slerp(llama["task1"], llama["task2"], out, progress=False)
    assert (out / ".cpift-output").is_file()
    r = cpift_merge(tmp_path, hub, "push", out, "me/m")
    assert r.returncode == 0, r.stderr
    arrived = hub.files("me/m")
    assert ".cpift-output" not in arrived
    assert {k for k in arrived if k != ".gitattributes"} == {p.name for p in out.iterdir()} - {".cpift-output"}
    partial = tmp_path / ".n.cpift-partial"
    shutil.copytree(out, partial)
    journal = tmp_path / "j"
    shutil.copytree(out, journal)
    (journal / "cpift-resume.json").write_text("{}")
    before = {p: p.read_bytes() for p in journal.iterdir()}
    for folder, repo in ((partial, "me/p"), (journal, "me/j")):
        one_line_error(cpift_merge(tmp_path, hub, "push", folder, repo), str(folder), "unfinished cpift output")
        assert repo not in hub.repos
    assert {p: p.read_bytes() for p in journal.iterdir()} == before
