"""demo.py driven as a user would: --prompt from a script, the terminal chat in a pseudo-terminal, model parallel 2
under torchrun, and the web page in a real headless browser (Playwright + Debian's chromium).

The model is the tiny preset with a real sentencepiece tokenizer, trained here for a second to answer every chat
message with ANSWER, so that a right answer is recognizable (and 4-bit keeps it).
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from model.args import ModelArgs
from tests.helpers import params_of, tiny_args
from util.build import build_model
from util.checkpoint import save_model, write_meta_checkpoint
from util.generate import Chat, SamplingParams
from util.templates import chat_prompt
from util.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "demo.py")
ANSWER = "Eat well, sleep enough, and exercise."
QUESTIONS = ["hello", "Give three tips for staying healthy.", "hi there", "what should I do?"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "out" / "test-artifacts"


def _train_chat_model(tok: Tokenizer) -> dict[str, torch.Tensor]:
    """Overfit the tiny model to answer ANSWER after the chat template (40 Adam steps, ~1 s)."""
    args = tiny_args(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model, _ = build_model(args, None, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    prompts = [tok.encode(chat_prompt([(q, None)]), bos=True) for q in QUESTIONS]
    seqs = [p + tok.encode(ANSWER, eos=True) for p in prompts]
    n = max(map(len, seqs))
    x = torch.tensor([s + [tok.eos_id] * (n - len(s)) for s in seqs])
    y = x[:, 1:].clone()
    for i, (p, s) in enumerate(zip(prompts, seqs)):  # loss on the answer and its EOS only
        y[i, : len(p) - 1] = -100
        y[i, len(s) - 1 :] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tokenizer.model + base/ (Meta format) of the trained tiny chat model."""
    d = tmp_path_factory.mktemp("demo_model")
    texts = [chat_prompt([(q, ANSWER) for q in QUESTIONS]), ANSWER, "naïve café ünïcode"] * 30
    tok = train_tokenizer(texts, d / "tokenizer.model", vocab_size=320)
    args = tiny_args(vocab_size=tok.vocab_size)
    write_meta_checkpoint(d / "base", _train_chat_model(tok), params=params_of(args))
    return d


@pytest.fixture(scope="module")
def quickstart_cwd(model_dir, tmp_path_factory):
    """A working directory laid out like the fine-tuning default: out/quickstart/{base,final,tokenizer.model}, where
    final is a trainable-only LoRA delta (B not zero, so it changes the model)."""
    cwd = tmp_path_factory.mktemp("quickstart_cwd")
    q = cwd / "out" / "quickstart"
    q.mkdir(parents=True)
    shutil.copytree(model_dir / "base", q / "base")
    shutil.copy(model_dir / "tokenizer.model", q / "tokenizer.model")
    lora_args = ModelArgs.from_json(q / "base" / "params.json").replace(lora_rank=4, lora_alpha=8.0)
    model, _ = build_model(lora_args, [q / "base"], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_model(model, q / "final", config=lora_args.to_dict(), trainable_only=True)
    return cwd


def run_demo(*args: str, cwd: Path = ROOT, stdin: str | None = None, timeout: float = 120, env: dict | None = None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, DEMO, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def model_args(model_dir: Path) -> list[str]:
    return ["--tokenizer_path", str(model_dir / "tokenizer.model"), "--pretrained_path", str(model_dir / "base")]


def test_without_the_default_model_it_says_how_to_make_it(tmp_path):
    r = run_demo(cwd=tmp_path)
    assert r.returncode == 2
    assert "make quickstart" in r.stderr and "main_finetune.py" in r.stderr and "out/quickstart/base" in r.stderr
    r = run_demo("--prompt", "  ", cwd=tmp_path)
    assert r.returncode == 2 and "--prompt is empty" in r.stderr


def test_a_broken_model_file_is_a_clear_error(model_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    r = run_demo("--tokenizer_path", str(tmp_path / "tokenizer.model"), "--pretrained_path", str(model_dir / "base"))
    assert r.returncode == 2 and "not a sentencepiece model" in r.stderr and "Traceback" not in r.stderr


def test_prompt_mode_answers_with_the_default_fine_tuned_model(quickstart_cwd):
    r = run_demo("--prompt", "Give three tips for staying healthy.", "--temperature", "0", cwd=quickstart_cwd)
    assert r.returncode == 0, r.stderr
    # the same answer from the same build in this process: base + LoRA delta, 4-bit, bf16 (the defaults)
    q = quickstart_cwd / "out" / "quickstart"
    model, _ = build_model(None, [q / "base", q / "final"], quant="4bit", dtype=torch.bfloat16)
    assert model.args.lora_rank == 4
    chat = Chat(model.eval(), Tokenizer(q / "tokenizer.model"))
    reply = chat.send("Give three tips for staying healthy.", SamplingParams(max_new_tokens=32, repetition_penalty=1.1))
    expected = "".join(reply)
    assert r.stdout == expected + "\n"
    assert "sleep" in expected  # the fine-tuned answer survives 4-bit and the delta
    assert "loaded out/quickstart/base, out/quickstart/final in" in r.stderr and "4bit" in r.stderr
    assert "peak CPU RSS" in r.stderr


def readme_command(program: str) -> list[str]:
    """The README's first command that runs `program` with --pretrained_path, as argv after the program (line
    continuations joined, the comment dropped)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if re.search(rf"\b{re.escape(program)} .*--pretrained_path", x))
    argv = shlex.split(line, comments=True)
    return argv[argv.index(program) + 1 :]


def test_the_readme_chat_command_loads_a_fine_tuned_delta(model_dir, tmp_path):
    """The README's fine-tuning command (a 2-step run) then its chat command, both as written, in a directory laid
    out like theirs: the delta's LoRA fields come from its params.json under --llama_config's base config."""
    (tmp_path / "llama-2-7b").mkdir()
    for f in [*(model_dir / "base").iterdir(), model_dir / "tokenizer.model"]:
        shutil.copy(f, tmp_path / "llama-2-7b" / f.name)
    for d in ("configs", "data"):
        (tmp_path / d).symlink_to(ROOT / d)
    tiny_run = shlex.split(
        "--max_iters 2 --batch_size 2 --max_words 64 --num_workers 0 --save_interval 0 --no_tensorboard"
    )
    cmd = [sys.executable, str(ROOT / "main_finetune.py"), *readme_command("main_finetune.py"), *tiny_run]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    chat = readme_command("demo.py")
    assert chat[chat.index("--pretrained_path") + 2] == "out/7b-qlora/final"  # where the fine-tuning command wrote
    assert (tmp_path / "out" / "7b-qlora" / "final" / "params.json").is_file()
    r = run_demo(*chat, "--prompt", "Give three tips for staying healthy.", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "loaded llama-2-7b, out/7b-qlora/final in" in r.stderr and "4bit" in r.stderr


def test_configuration_mistakes_are_one_error_line(quickstart_cwd, tmp_path):
    q = quickstart_cwd / "out" / "quickstart"
    model = ["--tokenizer_path", str(q / "tokenizer.model"), "--pretrained_path", str(q / "base"), str(q / "final")]
    no_lora, bad_type = tmp_path / "no_lora.json", tmp_path / "bad_type.json"
    no_lora.write_text('{"lora_rank": 0}')
    bad_type.write_text('{"n_layers": "2"}')
    # a config on top that drops the delta's LoRA: its tensors fit nothing (a KeyError inside)
    r = run_demo(*model, "--llama_config", str(no_lora), "--prompt", "hi")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert "are not in the model" in errors[0] and "lora" in errors[0] and not errors[0].startswith('error: "')
    # a value of the wrong type names the file and the key
    r = run_demo(*model, "--llama_config", str(bad_type), "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {bad_type}: n_layers='2' is not a valid value: expected int" in r.stderr.splitlines()
    # LAZYLLAMA_TRACEBACK=1 keeps the traceback for debugging
    r = run_demo(*model, "--llama_config", str(bad_type), "--prompt", "hi", env={"LAZYLLAMA_TRACEBACK": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "TypeError: " in r.stderr


def test_terminal_chat_in_a_pseudo_terminal(model_dir):
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        [DEMO, *model_args(model_dir), "--temperature", "0"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    try:
        child.expect("peak CPU RSS")  # load time and memory are printed first
        child.expect("you> ")
        child.sendline("hello")
        child.expect(r"assistant> (.*)\r\n")
        assert child.match.group(1).strip() == ANSWER
        child.expect("you> ")
        child.sendline("")
        child.expect(r"\(empty message")
        child.expect("you> ")
        child.sendline("healthy " * 300)  # longer than the 128-token context
        child.expect(r"warning: prompt of \d+ tokens truncated from the left")
        child.expect(r"assistant> (.*)\r\n")
        child.expect("you> ")
        child.sendline("/clear")
        child.expect(r"\(conversation cleared\)")
        child.expect("you> ")
        child.sendline("/bogus")
        child.expect("unknown command '/bogus'")
        child.expect("you> ")
        child.sendline("what should I do?")
        child.expect(r"assistant> (.*)\r\n")
        assert child.match.group(1).strip() == ANSWER
        child.expect("you> ")
        child.sendeof()  # Ctrl-D quits
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_model_parallel_2_under_torchrun(model_dir):
    port = _free_port()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            DEMO,
            "--model_parallel_size",
            "2",
            *model_args(model_dir),
            "--temperature",
            "0",
            "--device",
            "cpu",  # also on a GPU machine (gloo then): two ranks cannot share one GPU under NCCL
        ],
        cwd=ROOT,
        input="hello\n/clear\nwhat should I do?\n/quit\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 read the input and printed; both ranks generated (each step broadcasts rank 0's token)
    assert r.stdout.count(f"assistant> {ANSWER}") == 2, r.stdout
    assert r.stdout.count("Chat (commands") == 1 and r.stderr.count("peak CPU RSS") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def web_server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("web") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, DEMO, *model_args(model_dir), "--web", "--port", str(port), "--temperature", "0"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"demo.py --web exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"demo.py --web did not serve {url} in 90 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


LAST_BOT = "() => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]'); return b.length ? b[b.length - 1].innerText : null; }"  # noqa: E501
RECORD = """() => {
    window.__answers = [];  // every distinct text of the last answer, as the page shows it
    new MutationObserver(() => {
        const b = document.querySelectorAll('#chatbot [data-testid="bot"]');
        const t = b.length ? b[b.length - 1].innerText : null;
        if (t !== null && window.__answers[window.__answers.length - 1] !== t) window.__answers.push(t);
    }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""


def test_web_page_streams_an_answer_in_a_browser(web_server, browser, tmp_path):
    url, proc, log = web_server
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    external = []
    page.on("request", lambda req: None if req.url.startswith(url) else external.append(req.url))
    page.goto(url)
    box = page.locator("#message textarea")
    box.wait_for()
    assert page.locator("#image").count() == 0 or not page.locator("#image").is_visible()  # no images: hidden
    for label in ("Temperature", "Top-p", "Top-k", "Max new tokens", "Repetition penalty"):
        assert page.get_by_text(label).first.is_visible(), label
    page.evaluate(RECORD)

    # an empty message: a clear message, nothing sent
    box.fill("   ")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Empty message')")
    assert page.evaluate(LAST_BOT) is None

    # a real message: the answer appears piece by piece
    box.fill("hello")
    box.press("Enter")
    page.wait_for_function(f"() => ({LAST_BOT})() === {ANSWER!r}", timeout=30_000)
    seen = [t for t in page.evaluate("window.__answers") if t]
    assert len(seen) >= 3 and all(ANSWER.startswith(t) for t in seen), seen  # streamed, growing prefixes
    assert page.locator('#chatbot [data-testid="user"]').first.inner_text().strip() == "hello"
    assert page.locator("#message textarea").input_value() == ""
    assert page.locator("#status").inner_text().strip() == ""  # it fits: no note

    shot = tmp_path / "web_chat.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "web_chat.png")

    # a message longer than the context: truncated with a note, still answered
    box.fill("healthy " * 300)
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('truncated from the left')")
    page.wait_for_function(
        "() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 2", timeout=30_000
    )

    # Clear empties the conversation
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 0")
    assert external == [], f"the page fetched from outside the server: {external}"
    page.close()
    assert proc.poll() is None, log.read_text()


def test_web_api_refuses_an_unreadable_image_and_keeps_serving(web_server, tmp_path):
    from gradio_client import Client, handle_file

    url, proc, log = web_server
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"this is not a PNG")
    client = Client(url, verbose=False)
    history, box, status = client.predict(
        "describe this", [], handle_file(str(bad)), 0, 1, 0, 32, 1, api_name="/respond"
    )
    assert history == [] and box == "describe this"  # nothing sent, the message stays in the box
    assert "could not read the image photo.png" in status and "PNG, JPEG or WebP" in status
    good = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(good)
    _, _, status = client.predict("describe this", [], handle_file(str(good)), 0, 1, 0, 32, 1, api_name="/respond")
    assert "takes no images" in status  # the hook is there; this model has no visual backbone
    # streamed through the API too, and the server still answers
    job = client.submit("hello", [], None, 0, 1, 0, 32, 1, api_name="/respond")
    updates = [h[-1]["content"][0]["text"] for h, _, _ in job if h and h[-1]["role"] == "assistant"]
    assert updates[-1] == ANSWER and len(set(updates)) > 3
    assert proc.poll() is None, log.read_text()
