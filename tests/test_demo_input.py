"""demo.py with input that is not valid UTF-8 (a pipe, a terminal, --prompt, the web page) and with sampling values
that are not finite (issue 13): the chat goes on, or one usage error names the option."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import demo
from tests.test_demo import ANSWER, DEMO, ROOT, model_args, model_dir, web_server  # noqa: F401 - fixtures

NOT_UTF8 = "not valid UTF-8: its invalid bytes were replaced"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("plain ascii", "plain ascii"),
        ("naïve café", "naïve café"),
        (os.fsdecode(b"hot\xff"), "hot\ufffd"),  # a command-line byte that is not UTF-8 (surrogateescape)
        (os.fsdecode(b"\xe2\x82\xac \xff\xfe bad"), "€ \ufffd\ufffd bad"),  # valid characters are kept
        (os.fsdecode(b"cut \xe2\x82"), "cut \ufffd"),  # a character cut short
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),  # what a browser can send
    ],
)
def test_input_that_is_not_utf8_becomes_valid_text(text, expected):
    assert demo.as_valid_text(text) == (expected, text != expected)
    expected.encode("utf-8")  # the tokenizer can encode it


def test_a_prompt_argument_with_invalid_bytes_is_answered(model_dir):  # noqa: F811
    argv = [sys.executable, DEMO, *model_args(model_dir), "--temperature", "0", "--prompt", b"hot\xff"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert NOT_UTF8 in err and r.stdout.decode().strip() == ANSWER


@pytest.mark.parametrize("encoding", ["utf-8:strict", None])  # a strict stdin, and Python's default one
def test_invalid_bytes_piped_into_the_chat_are_answered_and_the_chat_goes_on(model_dir, encoding):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    if encoding:
        env["PYTHONIOENCODING"] = encoding
    r = subprocess.run(
        [sys.executable, DEMO, *model_args(model_dir), "--temperature", "0"],
        cwd=ROOT,
        input=b"\xff\xfe bad\nhello\n",
        capture_output=True,
        timeout=120,
        env=env,
    )
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert NOT_UTF8 in err
    assert out.count(f"assistant> {ANSWER}\n") == 2  # both messages answered, then Ctrl-D (end of input) quits


def test_invalid_bytes_typed_in_a_terminal_are_answered(model_dir):  # noqa: F811
    import pexpect

    child = pexpect.spawn(
        sys.executable, [DEMO, *model_args(model_dir), "--temperature", "0"], cwd=str(ROOT), timeout=60
    )
    try:
        child.expect(b"you> ")
        child.send(b"\xff\xfe bad\r")
        child.expect(NOT_UTF8.encode())
        child.expect(rb"assistant> (.*)\r\n")
        child.expect(b"you> ")
        child.sendline(b"hello")
        child.expect(rb"assistant> (.*)\r\n")
        assert child.match.group(1).decode().strip() == ANSWER
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_the_web_page_answers_a_message_with_a_lone_surrogate(web_server):  # noqa: F811
    """Sent as a browser can send it: JSON with a lone surrogate escape (gradio_client refuses to encode one)."""
    import json
    import urllib.request

    url, proc, log = web_server
    body = json.dumps({"data": ["hello \ud800", [], None, 0, 1, 0, 32, 1]}).encode()  # ASCII: "\\ud800"
    assert b"\\ud800" in body
    post = urllib.request.Request(f"{url}gradio_api/call/respond", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as resp:
        event_id = json.load(resp)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/respond/{event_id}", timeout=60) as resp:
        events = resp.read().decode()
    assert "event: error" not in events, events[-2000:]
    last = [line for line in events.splitlines() if line.startswith("data: ")][-1]
    history, box, status = json.loads(last[len("data: ") :])
    assert NOT_UTF8 in status and box == ""
    assert history[0]["content"][0]["text"] == "hello \ufffd"
    assert history[-1]["content"][0]["text"] == ANSWER
    assert proc.poll() is None, log.read_text()


@pytest.mark.parametrize("option", ["--temperature", "--top_p", "--repetition_penalty"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_sampling_value_that_is_not_finite_is_a_usage_error(option, value, capsys):
    with pytest.raises(SystemExit) as caught:
        demo.parse_args([f"{option}={value}", "--prompt", "hi"])  # '=': argparse takes a bare -inf for an option
    assert caught.value.code == 2
    assert f"argument {option}: {value!r} is not a finite number" in capsys.readouterr().err
