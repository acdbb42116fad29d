"""End-to-end check on a real ComfyUI server (CPU). Skipped unless ``COMFYUI_PATH`` is set.

``COMFYUI_PATH`` points at a ComfyUI checkout (baseline 0.3.64); ``COMFYUI_PYTHON`` optionally
names the interpreter of the virtualenv that has ComfyUI's requirements and this pack's
dependencies (default: the interpreter running pytest). The server is started with ``--cpu`` on
127.0.0.1 and a free port, loading only this pack (symlinked into a temporary ``custom_nodes``
folder given through ``extra_model_paths.yaml``, which also maps ``vqgan:`` / ``sundae:`` to a
temporary model folder), with temporary input/output/temp/user directories. Every workflow in
``workflows/`` is converted to the API format with ``/object_info``'s ``input_order`` and queued;
each must finish with ``status_str == "success"`` and save its images. The sampler's steps and
batch are capped as in ``test_workflows.py`` unless ``SUNDAE_SERVER_FULL=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-server test"
)

REPO = Path(__file__).resolve().parents[1]
PACK_FOLDER = "comfyui-sundae"
STARTUP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 600


def _load_workflow_helpers():
    """``ui_to_api``, ``make_fast``, ``make_standin_models`` … from test_workflows.py (by path, so
    it works whatever pytest's import mode)."""
    spec = importlib.util.spec_from_file_location("_sundae_test_workflows", Path(__file__).with_name("test_workflows.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wf_helpers = _load_workflow_helpers()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _post(url: str, payload: dict, timeout: float = 60):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode() or "{}")


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "comfyui.log"
        self.output = root / "output"

    def start(self) -> None:
        root = self.root
        custom = root / "custom_nodes"
        custom.mkdir()
        (custom / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
        models = root / "models"
        for folder in ("vqgan", "sundae"):
            (models / folder).mkdir(parents=True, exist_ok=True)
        self.standins = wf_helpers.make_standin_models(models)
        wf_helpers.install_example_inputs(root / "input")
        for d in ("output", "temp", "user"):
            (root / d).mkdir()
        yaml_path = root / "extra_model_paths.yaml"
        yaml_path.write_text(
            "sundae_test:\n"
            f"    base_path: {root}\n"
            "    custom_nodes: custom_nodes\n"
            "    vqgan: models/vqgan\n"
            "    sundae: models/sundae\n"
        )
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        cmd = [
            python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes", "--disable-all-custom-nodes",
            "--whitelist-custom-nodes", PACK_FOLDER, "--extra-model-paths-config", str(yaml_path),
            "--input-directory", str(root / "input"), "--output-directory", str(self.output),
            "--temp-directory", str(root / "temp"), "--user-directory", str(root / "user"),
        ]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_text()[-6000:]}")
            try:
                _get(self.url + "/system_stats", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        raise RuntimeError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log_text()[-6000:]}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if getattr(self, "log", None) is not None:
            self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("comfyui-server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        print(f"\nComfyUI log: {srv.log_path}")


@pytest.fixture(scope="module")
def object_info(server):
    return _get(server.url + "/object_info", timeout=120)


def test_pack_imports_cleanly(server, object_info):
    log = server.log_text()
    # core extras may fail on optional dependencies (e.g. torchaudio): only our pack matters here
    ours = [line for line in log.splitlines()
            if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK_FOLDER in line]
    assert not ours, "\n".join(ours) + "\n" + log[-6000:]
    assert f"custom_nodes/{PACK_FOLDER}" in log, "the pack was not loaded at all"
    from comfyui_sundae.nodes import NODE_DISPLAY_NAME_MAPPINGS

    for node_id, display in NODE_DISPLAY_NAME_MAPPINGS.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert info["display_name"] == display
        assert info["python_module"] == f"custom_nodes.{PACK_FOLDER}"
        assert info["category"].startswith("sundae")
    names = object_info["SundaeLoadVQGAN"]["input"]["required"]["vqgan_name"][0]
    assert "mnist-vq-f4.safetensors" in names and "pixels (256 levels, grey)" in names
    assert "mnist-vq.safetensors" in object_info["SundaeLoadPrior"]["input"]["required"]["prior_name"][0]
    templates = _get(server.url + "/api/workflow_templates")
    assert set(templates.get(PACK_FOLDER, [])) >= {p.stem for p in wf_helpers.WORKFLOWS}


def test_node_help_is_served_where_the_frontend_asks(server, object_info):
    """The frontend's help panel (``src/services/nodeHelpService.ts``) fetches
    ``/extensions/<pack>/docs/<NodeId>/<locale>.md``, then ``…/docs/<NodeId>.md``; the pack is the
    second part of the node's ``python_module``. Both must answer with the markdown."""
    from comfyui_sundae.nodes import NODE_CLASS_MAPPINGS

    for node_id in NODE_CLASS_MAPPINGS:
        pack = object_info[node_id]["python_module"].split(".")[1]
        for rel in (f"{node_id}/en.md", f"{node_id}.md"):
            with urllib.request.urlopen(f"{server.url}/extensions/{pack}/docs/{rel}", timeout=30) as r:
                assert r.status == 200, (node_id, rel, r.status)
                assert r.read().decode() == (REPO / "web" / "docs" / f"{node_id}" / "en.md").read_text(), rel


@pytest.mark.parametrize("path", wf_helpers.WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_on_server(path, server, object_info):
    workflow = json.loads(path.read_text())
    prompt = wf_helpers.ui_to_api(workflow, object_info)
    if os.environ.get("SUNDAE_SERVER_FULL") != "1":
        prompt = wf_helpers.make_fast(prompt)
    payload = {"prompt": prompt, "client_id": str(uuid.uuid4()), "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
    status, answer = _post(server.url + "/prompt", payload)
    assert status == 200, f"{path.name} rejected: {json.dumps(answer, indent=1)[:4000]}"
    prompt_id = answer["prompt_id"]
    started = time.monotonic()
    entry = None
    while time.monotonic() - started < RUN_TIMEOUT_S:
        history = _get(f"{server.url}/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and (
            entry["status"]["completed"] or entry["status"].get("status_str") == "error"
        ):
            break
        time.sleep(0.5)
    assert entry is not None, f"{path.name}: no history after {RUN_TIMEOUT_S} s\n{server.log_text()[-4000:]}"
    status_info = entry["status"]
    errors = [m for m in status_info.get("messages", []) if m[0] == "execution_error"]
    assert status_info.get("status_str") == "success", f"{path.name}: {json.dumps(errors, indent=1)[:6000]}"
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, f"{path.name}: no images saved"
    for img in images:
        assert (server.output / img.get("subfolder", "") / img["filename"]).is_file()
    print(f"{path.stem}: {len(images)} images in {time.monotonic() - started:.1f} s")
