"""`qlora serve` over real HTTP on loopback, driven by the official openai client, and `qlora generate`.

Two adapters are trained on two different tasks (upper-case a word, reverse a word) on one tiny base; one
`qlora serve` process serves both, and every request must get its own adapter's answer, also when the
requests for both adapters arrive together and are decoded in the same batches.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.data.pipeline import Row
from qlora_cli.errors import ModelError, QLoRAError
from qlora_cli.run_folder import load_adapted_model, open_run
from qlora_cli.scoring import generate, generation_case
from qlora_cli.serving.app import describe_validation_error, require_web_stack
from qlora_cli.serving.server import ModelServer, parse_adapter_arg
from qlora_cli.train.loop import run_train

from .conftest import make_config, serve_process, upper_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 400  # enough for the tiny model to solve both tasks on held-out words


def reverse_rows(n: int, seed: int) -> list[dict]:
    """A second tiny task: reverse a 3-5 letter word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 5)))
        rows.append({"prompt": f"reverse: {w}\nanswer: ", "completion": w[::-1]})
    return rows


TASKS = {"upper": upper_rows, "reverse": reverse_rows}


def held_out(task: str, n: int = 8) -> list[dict]:
    seen = {r["prompt"] for r in TASKS[task](2000, seed=10)}
    return [r for r in TASKS[task](60, seed=11) if r["prompt"] not in seen][:n]


@pytest.fixture(scope="module")
def runs(model_factory, tmp_path_factory):
    """{task: run folder} trained with `qlora train`'s function on one tiny qwen2 base, and each adapter's
    greedy answers to held-out prompts through qlora's normal one-adapter path."""
    base = model_factory("qwen2", initializer_range=0.1, seed=7)
    tmp = tmp_path_factory.mktemp("serve-runs")
    folders, answers = {}, {}
    for task, rows in TASKS.items():
        data = write_jsonl(tmp / f"{task}.jsonl", rows(2000, seed=10))
        cfg = make_config(
            base, data, tmp / task, max_steps=STEPS, micro_batch_size=16, learning_rate=5e-3,
            lora_target_modules="all-linear", warmup_steps=10, logging_steps=100,
        )  # fmt: skip
        run_train(cfg, console=Console(quiet=True))
        folders[task] = tmp / task
        model, tok = load_adapted_model(open_run(tmp / task), torch.device("cpu"))
        cases = [generation_case(Row("r", r), "completion", tok) for r in held_out(task)]
        answers[task] = generate(model, tok, [c.prompt_ids for c in cases], max_new_tokens=8)
    return base, folders, answers


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`qlora serve` with both adapters and runtime loading from the tests' temporary folders; its base URL."""
    _, folders, _ = runs
    args = ["--max-batch-size", "8", "--allow-runtime-lora", "--lora-root", str(tmp_path_factory.getbasetemp())]
    for task, folder in folders.items():
        args += ["--adapter", f"{task}={folder}"]
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with serve_process(args, log) as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, model: str, prompt, **kw) -> openai.types.Completion:
    kw.setdefault("max_tokens", 8)
    return client.completions.create(model=model, prompt=prompt, temperature=0, **kw)


# ---------------------------------------------------------------------------------------------
# serving


def test_models_and_health(server, client, runs):
    base, _, _ = runs
    ids = [m.id for m in client.models.list().data]
    assert ids == [base.name, "upper", "reverse"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok"


def test_concurrent_requests_each_get_their_own_adapters_answer(server, client, runs):
    """Done-when: both adapters in one process; 16 requests for the two tasks at once, decoded in shared
    batches, each answered by its own adapter: its normal-path answer, and the task solved (>= 90%)."""
    _, _, answers = runs
    jobs = [(task, i, r) for task in TASKS for i, r in enumerate(held_out(task))]
    before = httpx.get(f"{server}/health").json()
    start = threading.Barrier(len(jobs))

    def ask(job):
        task, _, row = job
        start.wait()
        return complete(client, task, row["prompt"]).choices[0]

    with ThreadPoolExecutor(len(jobs)) as pool:
        choices = list(pool.map(ask, jobs))
    for (task, i, row), choice in zip(jobs, choices):
        assert choice.text == answers[task][i], (task, row)
    for task in TASKS:
        got = [c.text for (t, _, _), c in zip(jobs, choices) if t == task]
        want = [r["completion"] for r in held_out(task)]
        assert sum(g == w for g, w in zip(got, want)) >= 0.9 * len(want), (task, got, want)
    assert sum(c.text == r["completion"].upper() for (t, _, r), c in zip(jobs, choices) if t == "reverse") <= 1
    after = httpx.get(f"{server}/health").json()
    assert after["mixed_forwards"] > before["mixed_forwards"]  # rows of both adapters shared forwards


def test_base_model_answers_differently(client, runs):
    base, _, answers = runs
    prompt = held_out("upper")[0]["prompt"]
    by_name = complete(client, base.name, prompt).choices[0].text
    assert complete(client, "base", prompt).choices[0].text == by_name
    assert by_name != answers["upper"][0]


def test_streaming_and_stop_strings(client, runs):
    _, _, answers = runs
    row = held_out("upper")[1]
    full = complete(client, "upper", row["prompt"], max_tokens=12)
    pieces, finish = [], []
    for chunk in complete(client, "upper", row["prompt"], max_tokens=12, stream=True):
        pieces.append(chunk.choices[0].text)
        finish.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == full.choices[0].text == answers["upper"][1]
    assert len([p for p in pieces if p]) > 1 and finish[-1] == full.choices[0].finish_reason == "stop"
    word = row["completion"]
    cut = complete(client, "upper", row["prompt"], stop=[word[2:4]]).choices[0]
    assert cut.text == word[:2] and cut.finish_reason == "stop"
    short = complete(client, "upper", row["prompt"], max_tokens=2).choices[0]
    assert short.text == word[:2] and short.finish_reason == "length"
    usage = complete(client, "upper", [row["prompt"], held_out("upper")[2]["prompt"]])
    assert [c.text for c in usage.choices] == [answers["upper"][1], answers["upper"][2]]
    assert usage.usage.completion_tokens == len(answers["upper"][1]) + len(answers["upper"][2]) + 2  # + EOS each


def test_chat_goes_through_the_chat_template(client, runs):
    """A chat request is the tokenizer's chat template with the generation prompt: the same text as a
    completions request for those token ids (stopping at the template's end-of-turn token too)."""
    _, folders, _ = runs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["reverse"])
    messages = [{"role": "user", "content": "reverse: abcd"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    chat = client.chat.completions.create(model="reverse", messages=messages, max_tokens=10, temperature=0)
    raw = complete(client, "reverse", ids["input_ids"], max_tokens=10).choices[0]  # stops at EOS only
    content = chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(ids["input_ids"]) and chat.choices[0].message.role == "assistant"
    assert raw.text.startswith(content) and (raw.text == content) == (
        raw.finish_reason == chat.choices[0].finish_reason
    )
    stream = client.chat.completions.create(
        model="reverse", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_seeded_sampling_repeats(client):
    """Sampling with a seed gives the same text every time; vLLM's ignore_eos (sent via extra_body) runs to
    max_tokens."""
    kw = dict(model="upper", prompt="upper: ab", max_tokens=10, temperature=1.5, extra_body={"ignore_eos": True})
    a, b = client.completions.create(seed=3, **kw), client.completions.create(seed=3, **kw)
    c = client.completions.create(seed=4, **kw)
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text
    assert a.usage.completion_tokens == 10


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_requests_get_openai_shaped_errors(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "nope", "x")
    assert e.value.body["code"] == "model_not_found" and "upper" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "upper", "x", max_tokens=100_000)
    assert "context length is 512 tokens" in e.value.body["message"] and e.value.body["param"] == "max_tokens"

    def post(path: str, body: str) -> httpx.Response:
        return httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"})

    r = post("/v1/completions", '{"model": "upper", "prompt": ')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", '{"model": "upper"}')
    assert r.status_code == 400 and r.json()["error"]["message"] == "missing required field 'messages'"
    r = post("/v1/chat/completions", '{"model": "upper", "messages": [{"content": "hi"}]}')
    assert r.status_code == 400 and "'messages[0].role'" in r.json()["error"]["message"]
    r = post("/v1/completions", '{"model": "upper", "prompt": "x", "temperature": "hot"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post("/v1/completions", '{"prompt": "x"}')
    assert r.status_code == 400 and r.json()["error"]["message"] == "missing required field 'model'"
    r = post("/v1/completions", '{"model": "upper", "prompt": "x", "n": 3}')
    assert r.status_code == 400 and "n=1" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", '{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}')
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_load_and_unload_adapters_at_run_time(server, client, runs, tmp_path):
    base, folders, answers = runs
    prompt = held_out("reverse")[0]["prompt"]

    def post(path: str, **body) -> httpx.Response:
        return httpx.post(f"{server}{path}", json=body, timeout=60)

    # an adapter whose weights do not fit this base: 400, and the others keep serving
    misfit = tmp_path / "misfit"
    shutil.copytree(folders["upper"], misfit)
    state = load_file(misfit / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, misfit / "adapter_model.safetensors")
    r = post("/v1/load_lora_adapter", lora_name="misfit", lora_path=str(misfit))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "the adapter's weights do not fit this server's base model"
    assert str(tmp_path) not in r.text and "q_proj" not in r.text  # no paths, nothing read from the files
    # trained with another compute dtype: a different quantized base
    other = tmp_path / "bf16"
    shutil.copytree(folders["upper"], other)
    cfg = yaml.safe_load((other / "qlora_config.yaml").read_text())
    (other / "qlora_config.yaml").write_text(yaml.safe_dump({**cfg, "bnb_4bit_compute_dtype": "bfloat16"}))
    r = post("/v1/load_lora_adapter", lora_name="bf16", lora_path=str(other))
    assert r.status_code == 400 and "differently quantized" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", lora_name="upper", lora_path=str(folders["reverse"]))
    assert r.status_code == 400 and "already being served" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", lora_name="x")
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
    assert complete(client, "upper", held_out("upper")[0]["prompt"]).choices[0].text == answers["upper"][0]

    r = post("/v1/load_lora_adapter", lora_name="rev2", lora_path=str(folders["reverse"]))
    assert r.status_code == 200, r.text
    assert "rev2" in [m.id for m in client.models.list().data]
    assert complete(client, "rev2", prompt).choices[0].text == answers["reverse"][0]
    # unloading while a request still runs on it: the request finishes on its own adapter, and an adapter
    # loaded meanwhile does not take over its slot
    body = {"model": "rev2", "prompt": prompt, "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    reference = post("/v1/completions", **body).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        text = [json.loads(next(line for line in lines if line.startswith("data: {"))[6:])["choices"][0]["text"]]
        assert post("/v1/unload_lora_adapter", lora_name="rev2").status_code == 200
        assert post("/v1/load_lora_adapter", lora_name="up2", lora_path=str(folders["upper"])).status_code == 200
        for line in lines:
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(text) == reference
    assert complete(client, "up2", held_out("upper")[0]["prompt"]).choices[0].text == answers["upper"][0]
    with pytest.raises(openai.NotFoundError):
        complete(client, "rev2", prompt)
    assert post("/v1/unload_lora_adapter", lora_name="rev2").status_code == 404
    assert post("/v1/unload_lora_adapter", lora_name="up2").status_code == 200
    assert post("/v1/unload_lora_adapter", lora_name=base.name).status_code == 404  # the base stays
    assert complete(client, "reverse", prompt).choices[0].text == answers["reverse"][0]


def test_client_leaving_mid_stream_does_not_disturb_others(server, client, runs):
    _, _, answers = runs
    before = httpx.get(f"{server}/health").json()["generated_tokens"]
    body = {"model": "base", "prompt": "x", "max_tokens": 480, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        events = (json.loads(line[len("data: ") :]) for line in r.iter_lines() if line.startswith("data: {"))
        assert all(next(events)["choices"][0]["text"] is not None for _ in range(3))
        # another request while the stream is running
        assert complete(client, "upper", held_out("upper")[3]["prompt"]).choices[0].text == answers["upper"][3]
    # the stream is closed: its row is dropped at the next step, long before its 480 tokens
    deadline = time.monotonic() + 20
    while httpx.get(f"{server}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    generated = httpx.get(f"{server}/health").json()["generated_tokens"] - before
    assert generated < 300, generated
    assert complete(client, "reverse", held_out("reverse")[3]["prompt"]).choices[0].text == answers["reverse"][3]


# ---------------------------------------------------------------------------------------------
# startup, the CLI


def test_adapters_must_share_base_and_quantization(runs, tmp_path):
    base, folders, _ = runs
    other = tmp_path / "bf16"
    shutil.copytree(folders["upper"], other)
    cfg = yaml.safe_load((other / "qlora_config.yaml").read_text())
    (other / "qlora_config.yaml").write_text(yaml.safe_dump({**cfg, "bnb_4bit_compute_dtype": "bfloat16"}))
    with pytest.raises(ModelError, match="differently quantized bases .*compute float32 vs .*compute bfloat16"):
        ModelServer(adapters=[("a", str(folders["upper"])), ("b", str(other))], device="cpu")
    moved = tmp_path / "other-base"
    shutil.copytree(folders["reverse"], moved)
    (tmp_path / "elsewhere").mkdir()  # another base that exists (a missing one is its own error)
    (moved / "qlora_config.yaml").write_text(yaml.safe_dump({**cfg, "base_model": str(tmp_path / "elsewhere")}))
    with pytest.raises(ModelError, match="different base models"):
        ModelServer(adapters=[("a", str(folders["upper"])), ("b", str(moved))], device="cpu")
    with pytest.raises(ModelError, match="given twice"):
        ModelServer(adapters=[("a", str(folders["upper"])), ("a", str(folders["reverse"]))], device="cpu")
    with pytest.raises(ModelError, match="nothing to serve"):
        ModelServer()
    assert parse_adapter_arg("sql=runs/text2sql") == ("sql", "runs/text2sql")
    assert parse_adapter_arg("runs/text2sql/") == ("text2sql", "runs/text2sql/")
    result = CliRunner().invoke(app, ["serve", "--adapter", f"a={folders['upper']}", "--adapter", f"b={other}"])
    assert result.exit_code == 2 and "differently quantized" in result.output


def test_missing_web_stack_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(QLoRAError, match=r"qlora serve needs fastapi and uvicorn: pip install 'qlora-cli\[serve\]'"):
        require_web_stack()


def test_validation_errors_name_the_field():
    union = [
        {"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "Input should be a valid string", "input": 5},
        {
            "type": "list_type",
            "loc": ("body", "prompt", "list[str]"),
            "msg": "Input should be a valid list",
            "input": 5,
        },
    ]
    assert describe_validation_error(union) == ("invalid value for field 'prompt': 5", "prompt")
    nested = [{"type": "missing", "loc": ("body", "messages", 1, "content"), "msg": "Field required"}]
    assert describe_validation_error(nested) == ("missing required field 'messages[1].content'", "messages")


def test_generate_command_streams_the_adapters_answer(runs):
    _, folders, answers = runs
    row = held_out("upper")[4]
    result = CliRunner().invoke(
        app, ["generate", str(folders["upper"]), "--prompt", row["prompt"], "--max-tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == answers["upper"][4] + "\n"
    result = CliRunner().invoke(app, ["generate", str(folders["upper"]), "-p", "x", "--max-tokens", "600"])
    assert result.exit_code == 2 and "context length of 512 tokens" in result.output
    result = CliRunner().invoke(app, ["generate", str(folders["upper"]) + "-missing", "-p", "x"])
    assert result.exit_code == 2 and "run folder not found" in result.output


# ---------------------------------------------------------------------------------------------
# security: what a client may make the server do


def code_running_folder(run: Path, dest: Path, marker: Path) -> Path:
    """A copy of ``run`` whose config asks for remote code and whose tokenizer names a module (``auto_map``)
    that writes ``marker`` when imported: what an attacker puts where the server can read it."""
    shutil.copytree(run, dest)
    cfg = yaml.safe_load((dest / "qlora_config.yaml").read_text())
    (dest / "qlora_config.yaml").write_text(yaml.safe_dump({**cfg, "trust_remote_code": True}))
    (dest / "evil_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    tok_cfg = json.loads((dest / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return dest


def test_a_client_folder_never_runs_code(server, client, runs, tmp_path):
    """The remote-code-execution report: a folder saying trust_remote_code with an auto_map tokenizer. The
    loading policy is the operator's; the module must never be imported (its marker file never written)."""
    _, folders, answers = runs
    marker = tmp_path / "PWNED"
    evil = code_running_folder(folders["upper"], tmp_path / "evil", marker)
    r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(evil)}, timeout=60)
    assert not marker.exists(), "the client's folder ran code inside the server"
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:  # loaded as plain files: the adapter itself is a good one
        prompt = held_out("upper")[0]["prompt"]
        assert complete(client, "evil", prompt).choices[0].text == answers["upper"][0]
        assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "evil"}).status_code == 200
    assert not marker.exists()


def test_runtime_paths_are_confined_to_the_roots(server, runs, tmp_path):
    """Outside every --lora-root (directly, through a symlink, or a link inside the folder) and missing paths
    all get the same answer, which names no path."""
    _, folders, _ = runs
    outside = Path(tempfile.mkdtemp(prefix="qlora-outside-"))
    try:
        shutil.copytree(folders["reverse"], outside / "run")
        link = tmp_path / "link"
        link.symlink_to(outside / "run")
        leaky = tmp_path / "leaky"
        shutil.copytree(folders["reverse"], leaky)
        (leaky / "adapter_model.safetensors").unlink()
        (leaky / "adapter_model.safetensors").symlink_to(outside / "run" / "adapter_model.safetensors")
        answers = []
        for path in (outside / "run", link, leaky, tmp_path / "missing", "../../../" + str(outside / "run"), "/etc"):
            r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)})
            assert r.status_code == 400, (path, r.text)
            answers.append(r.json()["error"]["message"])
            assert str(outside) not in r.text and str(tmp_path) not in r.text
        assert set(answers) == {"lora_path is not an adapter folder this server may load"}
        # inside the roots, a relative path is looked up under them
        relative = Path(folders["reverse"]).relative_to(Path(folders["reverse"]).parents[1])
        r = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "rel", "lora_path": str(relative)})
        assert r.status_code == 200, r.text
        assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "rel"}).status_code == 200
    finally:
        shutil.rmtree(outside)


def test_bad_adapter_files_are_400s_that_echo_nothing(server, runs, tmp_path):
    _, folders, _ = runs
    secret = "s3cret-value-from-a-file"

    def load(folder: Path) -> httpx.Response:
        return httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": folder.name, "lora_path": str(folder)})

    cases = {}
    cases["json-list"] = lambda d: (d / "adapter_config.json").write_text(json.dumps([secret]))
    cases["bad-json"] = lambda d: (d / "adapter_config.json").write_text("{" + secret)
    cases["pickle"] = lambda d: torch.save({"x": torch.zeros(2)}, d / "adapter_model.safetensors")
    cases["huge-config"] = lambda d: (d / "adapter_config.json").write_text(" " * (2 << 20) + "{}")
    cases["huge-header"] = lambda d: (d / "adapter_model.safetensors").write_bytes((1 << 40).to_bytes(8, "little"))
    cases["truncated"] = lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:200]
    )
    cfg = json.loads((Path(folders["upper"]) / "adapter_config.json").read_text())
    cases["rank"] = lambda d: (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 128}))
    for name, spoil in cases.items():
        folder = tmp_path / name
        shutil.copytree(folders["upper"], folder)
        spoil(folder)
        r = load(folder)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert secret not in r.text and str(tmp_path) not in r.text, (name, r.text)
    assert "--max-lora-rank is 64" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_models_list_shows_no_server_paths(server, runs):
    _, folders, _ = runs
    text = httpx.get(f"{server}/v1/models").text
    assert "upper" in text and str(Path(folders["upper"]).parent) not in text


@pytest.fixture(scope="module")
def locked_server(runs, tmp_path_factory):
    """A server started with defaults and an API key from QLORA_API_KEY: no runtime loading."""
    _, folders, _ = runs
    log = tmp_path_factory.mktemp("locked-log") / "server.log"
    env = {**os.environ, "QLORA_API_KEY": "sk-test-key"}
    with serve_process(["--adapter", f"upper={folders['upper']}"], log, env=env) as (url, proc):
        yield url, proc


def test_api_key_is_required_on_every_endpoint_but_health(locked_server, runs):
    _, folders, answers = runs
    locked_server, _ = locked_server
    assert httpx.get(f"{locked_server}/health").status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/load_lora_adapter"), ("GET", "/openapi.json")):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer sk-test-kex"}, {"Authorization": "Basic sk-test-key"}):
            r = httpx.request(method, f"{locked_server}{path}", headers=headers, json={})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{locked_server}/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        complete(wrong, "upper", "x")
    right = openai.OpenAI(base_url=f"{locked_server}/v1", api_key="sk-test-key", max_retries=0, timeout=60)
    assert complete(right, "upper", held_out("upper")[0]["prompt"]).choices[0].text == answers["upper"][0]
    assert [m.id for m in right.models.list().data][-1] == "upper"


def test_runtime_loading_is_off_unless_the_operator_turns_it_on(locked_server, runs, tmp_path):
    _, folders, _ = runs
    locked_server, _ = locked_server
    headers = {"Authorization": "Bearer sk-test-key"}
    body = {"lora_name": "again", "lora_path": str(folders["reverse"])}
    r = httpx.post(f"{locked_server}/v1/load_lora_adapter", json=body, headers=headers)
    assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
    r = httpx.post(f"{locked_server}/v1/unload_lora_adapter", json={"lora_name": "upper"}, headers=headers)
    assert r.status_code == 403
    r = httpx.get(f"{locked_server}/v1/models", headers=headers)
    assert [m["id"] for m in r.json()["data"]][-1] == "upper"  # still served


def test_operator_flags_are_checked_at_startup(runs, tmp_path):
    _, folders, _ = runs
    result = CliRunner().invoke(app, ["serve", "--adapter", f"a={folders['upper']}", "--allow-runtime-lora"])
    assert result.exit_code == 2 and "--lora-root" in result.output
    result = CliRunner().invoke(app, ["serve", "--adapter", f"a={folders['upper']}", "--lora-root", "/nonexistent"])
    assert result.exit_code == 2 and "not a folder" in result.output
    result = CliRunner().invoke(app, ["serve", "--adapter", f"a={folders['upper']}", "--max-lora-rank", "8"])
    assert result.exit_code == 2 and "rank 16" in result.output and "--max-lora-rank is 8" in result.output
    marker = tmp_path / "PWNED"
    evil = code_running_folder(folders["upper"], tmp_path / "evil", marker)
    server = ModelServer(adapters=[("evil", str(evil))], device="cpu")  # the operator did not pass the flag
    server.close()
    assert not marker.exists()


@pytest.mark.parametrize(
    "env, flag, says",
    [
        ({"QLORA_API_KEY": ""}, [], "must not be empty"),  # click reads it as unset: authentication was off
        ({"QLORA_API_KEY": "  "}, [], "must not be empty"),
        ({"QLORA_API_KEY": " sk-key\n"}, [], "leading or trailing whitespace"),  # could never match a header
        ({}, ["--api-key", "sk-key "], "leading or trailing whitespace"),
    ],
)
def test_an_empty_or_padded_api_key_is_a_startup_error(monkeypatch, env, flag, says):
    import qlora_cli.serving.app as app_mod

    started = []  # a server that would have started (without authentication) is recorded, not run
    monkeypatch.setattr(app_mod, "run_serve", lambda *a, **k: started.append(k["policy"]))
    result = CliRunner(env=env).invoke(app, ["serve", "--adapter", "a=/nowhere", "--port", "0", *flag])
    assert result.exit_code == 2 and not started, (result.output, started)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.output
    result = CliRunner(env={"QLORA_API_KEY": "sk-key"}).invoke(app, ["serve", "--adapter", "a=/nowhere"])
    assert result.exit_code == 0 and started[0].api_key == "sk-key", result.output


# ---------------------------------------------------------------------------------------------
# denial of service: one request never takes the server or other clients down


def test_a_prompt_over_the_context_is_refused_without_max_tokens(client, server):
    """A chat request without max_tokens used to skip the length check (2,019 tokens on a 512-token model)."""
    long = "ab" * 1010
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="upper", messages=[{"role": "user", "content": long}])
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="upper", prompt=[5] * 600)


def test_a_megabyte_prompt_is_refused_while_health_keeps_answering(server):
    body = {"model": "upper", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    result: dict = {}

    def send():
        result["r"] = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)

    thread = threading.Thread(target=send)
    thread.start()
    latencies = []
    while thread.is_alive() or not latencies:
        t0 = time.monotonic()
        assert httpx.get(f"{server}/health", timeout=5).status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05)
    thread.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert max(latencies) < 1.0, latencies


def test_one_bad_request_does_not_fail_the_others_in_its_batch(client, server, runs):
    """An out-of-vocabulary token id used to fail every request prefilled with it (all 500)."""
    _, _, answers = runs
    rows = held_out("upper")[:4]
    start = threading.Barrier(len(rows) + 2)

    def good(i):
        start.wait()
        return complete(client, "upper", rows[i]["prompt"]).choices[0].text

    def bad(ids):
        start.wait()
        return httpx.post(
            f"{server}/v1/completions", json={"model": "upper", "prompt": ids, "max_tokens": 4}, timeout=60
        )

    with ThreadPoolExecutor(len(rows) + 2) as pool:
        goods = [pool.submit(good, i) for i in range(len(rows))]
        bads = [pool.submit(bad, [3, 10**6]), pool.submit(bad, [-1])]
        assert [f.result() for f in goods] == answers["upper"][:4]
        for f in bads:
            r = f.result()
            assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"], r.text


def test_client_errors_are_400s_not_500s(server):
    def post(body: str) -> httpx.Response:
        return httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})

    r = post('{"model": "upper", "prompt": "x", "seed": 18446744073709551616}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = post('{"model": "upper", "prompt": "a\\ud800b"}')
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server}/v1/chat/completions",
        content='{"model": "upper", "messages": [{"role": "user", "content": "\\udfff"}]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    assert post('{"model": "upper", "prompt": "x", "seed": 18446744073709551615, "max_tokens": 1}').status_code == 200


def test_a_non_streaming_client_that_leaves_stops_its_generation(server):
    before = httpx.get(f"{server}/health").json()["generated_tokens"]
    body = {"model": "base", "prompt": "x", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 20
    while httpx.get(f"{server}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    generated = httpx.get(f"{server}/health").json()["generated_tokens"] - before
    assert generated < 450, generated  # all 480 without the disconnect check


def test_sigterm_stops_the_server_within_seconds_while_it_generates(locked_server):
    """Last test of the module: it stops the locked server."""
    url, proc = locked_server
    body = {"model": "base", "prompt": "x", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    headers = {"Authorization": "Bearer sk-test-key"}

    def ask():
        try:
            httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        except httpx.HTTPError:
            pass  # the server went away mid-request: expected

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.terminate()
    proc.wait(timeout=15)
    assert time.monotonic() - t0 < 10


def test_a_plain_peft_folder_joins_a_float32_server(runs, tmp_path):
    """A PEFT adapter folder records no quantization: it is served on whatever the run folders say, not
    refused for an assumed bfloat16."""
    base, folders, answers = runs
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(Path(folders["upper"]) / name, plain / name)
    server = ModelServer(adapters=[("reverse", str(folders["reverse"])), ("plain", str(plain))], device="cpu")
    try:
        assert server.settings.quant.compute_dtype == "float32"
        assert "plain" in server.served
    finally:
        server.close()


def test_runtime_loading_reads_no_file_outside_the_roots(tmp_path, llama_dir):
    """Every file read for a runtime-loaded adapter resolves under a --lora-root: the run folder's config and
    tokenizer above a checkpoint, the parent of a root named best, a tokenizer_config.json naming another file,
    a named pipe in place of a file (it used to block the loading lock for good)."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from qlora_cli.serving.policy import ServePolicy
    from qlora_cli.serving.server import RequestError

    from .test_merge import make_run

    def copy_adapter(src: Path, dst: Path, tokenizer: bool = False) -> Path:
        dst.mkdir(parents=True)
        names = ["adapter_model.safetensors", "adapter_config.json"]
        names += ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] if tokenizer else []
        for name in names:
            shutil.copy(src / name, dst / name)
        return dst

    data = write_jsonl(tmp_path / "d.jsonl", upper_rows(4, seed=1))
    root, outside = tmp_path / "root", tmp_path / "outside"
    run = make_run(llama_dir, root / "run", data)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(llama_dir / name, run / name)
    step = copy_adapter(run, run / "checkpoints" / "step-1")
    outside.mkdir()
    # an outside tokenizer that says so: one more token
    theirs = AutoTokenizer.from_pretrained(llama_dir)
    theirs.add_special_tokens({"additional_special_tokens": ["<|outside|>"]})
    theirs.save_pretrained(outside / "tok")
    policy = ServePolicy(allow_runtime_lora=True, lora_roots=(root.resolve(),))
    server = ModelServer(adapters=[("a", str(run))], device="cpu", policy=policy)
    try:
        server.load_adapter("ok", str(step))  # inside the roots: loads
        assert "<|outside|>" not in server.served["ok"].tokenizer.get_vocab()

        def refused(name: str, path: Path) -> None:
            with pytest.raises(RequestError) as e:
                server.load_adapter(name, str(path))
            assert str(tmp_path) not in str(e.value), e.value
            assert name not in server.served

        # the run folder's files above the checkpoint, linked outside
        for linked in ("qlora_config.yaml", "tokenizer.json"):
            shutil.move(run / linked, outside / linked)
            (run / linked).symlink_to(outside / linked)
            refused(f"link-{linked}", step)
            (run / linked).unlink()
            shutil.move(outside / linked, run / linked)
        # a tokenizer_config.json that names a tokenizer file outside ("../" is not refused by transformers)
        fast = copy_adapter(run, root / "fast", tokenizer=True)
        config = json.loads((fast / "tokenizer_config.json").read_text())
        config["fast_tokenizer_files"] = ["../../outside/tok/tokenizer.1.json"]
        shutil.copy(outside / "tok" / "tokenizer.json", outside / "tok" / "tokenizer.1.json")
        (fast / "tokenizer_config.json").write_text(json.dumps(config))
        server.load_adapter("fast", str(fast))
        assert "<|outside|>" not in server.served["fast"].tokenizer.get_vocab()
        # a root named best: its parent's qlora_config.yaml is outside the roots
        best = copy_adapter(run, tmp_path / "best")
        shutil.copy(run / "qlora_config.yaml", tmp_path / "qlora_config.yaml")
        server.policy = replace(policy, lora_roots=(best.resolve(),))
        refused("best", best)
        server.policy = policy
        # a named pipe where adapter_config.json should be: refused at once, the lock left free
        pipe = copy_adapter(run, root / "pipe")
        (pipe / "adapter_config.json").unlink()
        os.mkfifo(pipe / "adapter_config.json")
        outcome: list[BaseException | None] = []

        def load_pipe() -> None:
            try:
                server.load_adapter("pipe", str(pipe))
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - judged below, on the test's thread
                outcome.append(e)

        worker = threading.Thread(target=load_pipe, daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "loading a named pipe blocked"
        assert isinstance(outcome[0], RequestError) and "pipe" not in server.served, outcome
        server.unload_adapter("ok")
    finally:
        server.close()
