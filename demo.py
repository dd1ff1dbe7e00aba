"""Chat with a lazily built (quantized) LLaMA: in the terminal, for one --prompt, or in a web page (--web).

  python demo.py                                   # the bundled fine-tuning default (out/quickstart), 4-bit
  python demo.py --prompt "Give three tips for staying healthy."
  python demo.py --web --port 7860                 # a Gradio page on http://127.0.0.1:7860
  python demo.py --llama_config params.json --tokenizer_path tokenizer.model --pretrained_path llama-2-7b/ \\
      --quant 4bit
  torchrun --nproc_per_node 2 demo.py --model_parallel_size 2 ...   # model parallel: rank 0 reads and prints

Terminal commands: /clear (forget the conversation), /help, /quit (or Ctrl-D).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

# What `make quickstart` / `python main_finetune.py` (the bundled fine-tuning default) produce.
DEFAULT_BASE = Path("out/quickstart/base")
DEFAULT_DELTA = Path("out/quickstart/final")
DEFAULT_TOKENIZER = Path("out/quickstart/tokenizer.model")
HELP = "commands: /clear forgets the conversation, /quit (or Ctrl-D) quits, /help shows this"
# Speculative decoding (util.speculative) by default: chat answers often quote the conversation, and a draft that
# finds no match costs nothing (the plain one-token step runs).
DRAFT_TOKENS = 6


def finite_float(text: str) -> float:
    """argparse type: a number, not NaN or Inf (sampling with them gives NaN probabilities, or only noise)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def as_valid_text(text: str) -> tuple[str, bool]:
    """(text, changed): input that was not valid UTF-8 made valid, each invalid byte a U+FFFD. Python hands such
    bytes over as lone surrogates (the command line, and a terminal or pipe read with surrogateescape); a browser
    can send lone surrogates too. The tokenizer cannot encode them, so they are replaced here and the chat goes on."""
    if not _SURROGATE.search(text):
        return text, False
    # escaped bytes (U+DC80-U+DCFF) back to bytes, other lone surrogates to U+FFFD, then a lenient decode
    text = re.sub("[\ud800-\udc7f\udd00-\udfff]", "\ufffd", text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True


_SURROGATE = re.compile("[\ud800-\udfff]")
NOT_UTF8 = "the message was not valid UTF-8: its invalid bytes were replaced by \ufffd"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (no arguments: the bundled fine-tuning default in out/quickstart)")
    m.add_argument("--llama_config", nargs="+", type=Path, help="JSON config(s), merged in order (later wins)")
    m.add_argument(
        "--tokenizer_path",
        type=Path,
        help="tokenizer.model (sentencepiece or Llama 3's tiktoken), tokenizer.json, or a folder holding one",
    )
    m.add_argument("--pretrained_path", nargs="+", type=Path, help="checkpoint(s) loaded in order: base, deltas")
    m.add_argument("--quant", default="4bit", choices=["none", "4bit", "4bit_fp4", "8bit"])
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    m.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    m.add_argument("--model_parallel_size", type=int, default=1, help="launch with torchrun --nproc_per_node N")
    m.add_argument("--raw", action="store_true", help="no chat template and no history (a base model)")
    m.add_argument(
        "--chat_format",
        default="auto",
        choices=["auto", "lazyllama", "llama2", "llama3"],
        help="auto: from the tokenizer (its chat template; Llama 3's header tokens), else this project's template",
    )
    s = p.add_argument_group("sampling (the web page has its own controls)")
    s.add_argument("--max_new_tokens", type=int, default=None, help="default: 128, at most a quarter of the context")
    s.add_argument("--temperature", type=finite_float, default=0.7, help="0: greedy")
    s.add_argument("--top_p", type=finite_float, default=0.9)
    s.add_argument("--top_k", type=int, default=0, help="0: no limit")
    s.add_argument("--repetition_penalty", type=finite_float, default=1.1, help="1: off")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument(
        "--draft_tokens",
        type=int,
        default=DRAFT_TOKENS,
        help="speculative decoding: up to N tokens drafted from the conversation (prompt lookup) and checked in "
        "one forward; same output distribution, faster when answers quote the prompt (0: off)",
    )
    p.add_argument(
        "--save_quantized",
        type=Path,
        default=None,
        help="after building, write the quantized model here (a later --pretrained_path DIR skips quantization)",
    )
    u = p.add_argument_group("interface (default: chat in the terminal)")
    u.add_argument("--prompt", help="answer this one message on stdout and exit")
    u.add_argument(
        "--image",
        type=Path,
        help="--prompt / terminal chat: an image (PNG, JPEG, WebP) the conversation is about "
        "(a model with a visual backbone)",
    )
    u.add_argument("--web", action="store_true", help="serve a Gradio chat page")
    u.add_argument("--host", default="127.0.0.1", help="web: address to bind (0.0.0.0 exposes it to the network)")
    u.add_argument("--port", type=int, default=7860)
    opts = p.parse_args(argv)
    if opts.prompt is not None and opts.web:
        p.error("--prompt and --web exclude each other")
    if opts.prompt is not None and not opts.prompt.strip():
        p.error("--prompt is empty: pass the message to answer, e.g. --prompt 'Give three tips for staying healthy.'")
    return opts


def resolve_paths(opts: argparse.Namespace) -> argparse.Namespace:
    """The default model filled in, checked before the heavy imports: a ValueError says what is missing and how to
    get it."""
    opts = argparse.Namespace(**vars(opts))
    if opts.llama_config is None and opts.tokenizer_path is None and opts.pretrained_path is None:
        opts.pretrained_path, opts.tokenizer_path = [DEFAULT_BASE, DEFAULT_DELTA], DEFAULT_TOKENIZER
        missing = [str(p) for p in (DEFAULT_BASE, DEFAULT_DELTA, DEFAULT_TOKENIZER) if not p.exists()]
        if missing:
            raise ValueError(
                f"the default model is not there (missing: {', '.join(missing)} under {Path.cwd()}). "
                "Produce it with `make quickstart` or `python main_finetune.py` (the bundled fine-tuning default), "
                "or point at a model: --llama_config params.json --tokenizer_path tokenizer.model "
                "--pretrained_path CHECKPOINT"
            )
    if opts.tokenizer_path is None:  # Meta and HF checkpoints ship tokenizer.model / tokenizer.json with the weights
        names = ("tokenizer.json", "tokenizer.model")
        found = [p for p in opts.pretrained_path or [] if any((p / n).is_file() for n in names)]
        if not found:
            raise ValueError("no tokenizer: pass --tokenizer_path tokenizer.model (or tokenizer.json)")
        opts.tokenizer_path = found[0]
    if opts.llama_config is None and not opts.pretrained_path:
        raise ValueError(
            "no model: pass --pretrained_path CHECKPOINT (and/or --llama_config params.json for its shape)"
        )
    paths = [*(opts.llama_config or []), opts.tokenizer_path, *(opts.pretrained_path or []), opts.image]
    missing = [str(p) for p in paths if p is not None and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"not found: {', '.join(missing)}")
    if opts.image is not None:
        if opts.web:
            raise ValueError("--image is for --prompt and the terminal chat; the web page has its own image box")
        read_image(opts.image)  # an unreadable image is reported before the model loads
    return opts


def load(opts: argparse.Namespace, device: str, log):
    """Tokenizer, the config (model_config's rule), then build_model (meta -> quantize -> materialize and load)
    with each checkpoint opened once; prints load time and memory."""
    import torch

    from util.build import build_model, model_config, open_checkpoints
    from util.cli import save_quantized_for_reuse
    from util.quant import prepare_for_inference
    from util.tokenizer import Tokenizer

    tokenizer = Tokenizer(opts.tokenizer_path)
    if not opts.pretrained_path:
        log("warning: no --pretrained_path, the weights are random")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.dtype]
    quant = None if opts.quant == "none" else opts.quant
    t0 = time.perf_counter()
    with open_checkpoints(opts.pretrained_path) as readers:
        args = model_config(readers, opts.llama_config or [], tokenizer=tokenizer)
        model, report = build_model(args, readers, quant=quant, dtype=dtype, device=device)
    paths = ", ".join(map(str, opts.pretrained_path or ["random init"]))
    log(f"loaded {paths} in {time.perf_counter() - t0:.1f} s ({opts.quant}, {opts.dtype}, {device})")
    log(report.summary())
    if opts.save_quantized:
        save_quantized_for_reuse(model, opts.save_quantized, log)
    repacked = prepare_for_inference(model)  # eval mode; on AVX512-BF16 CPUs 4-bit layers use the fast kernel
    if repacked:
        log(f"{repacked} 4-bit layers repacked for CPU inference")
    return model, tokenizer


class Group:
    """Rank 0 decides (reads input, takes web requests) and shares each request with the other ranks, which all
    generate with it; a single process shares with nobody."""

    def __init__(self, model_parallel_size: int, backend: str | None = None) -> None:
        self.rank, self.world_size = 0, 1
        if model_parallel_size > 1 or "RANK" in os.environ:
            import torch.distributed as dist

            from util.dist import control_group, init_distributed

            info = init_distributed(model_parallel_size, backend=backend)
            if info.world_size != model_parallel_size:
                raise ValueError(
                    f"demo.py serves one model: launch exactly --model_parallel_size={model_parallel_size} "
                    f"processes (torchrun --nproc_per_node {model_parallel_size}), not {info.world_size}"
                )
            self.rank, self.world_size, self._dist = info.rank, info.world_size, dist
            # Requests go over gloo with a long timeout: the other ranks wait in it while rank 0 waits for a
            # person, and NCCL's watchdog would abort that wait after 10 minutes.
            self._control = control_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]


def sampling(opts: argparse.Namespace):
    from util.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
        repetition_penalty=opts.repetition_penalty,
        seed=opts.seed,
        draft_tokens=opts.draft_tokens,
    )


def answer(chat, request, images=None):
    """Every rank runs this with the same request: (turns, message, SamplingParams[, images]). images: the --image
    (the web page sends its upload inside the request, so model-parallel followers get it too)."""
    turns, message, params, *rest = request
    if rest and rest[0] is not None:
        images = rest[0]
    chat.turns = list(turns)
    return chat.send(message, params, images=images)


def run_prompt(chat, group: Group, opts, log, images=None) -> int:
    prompt, changed = as_valid_text(opts.prompt)
    if changed:
        log(f"warning: {NOT_UTF8}")
    reply = answer(chat, ([], prompt, sampling(opts)), images)
    for note in reply.notes:
        log(f"warning: {note}")
    for delta in reply:
        if group.is_main:
            print(delta, end="", flush=True)
    if group.is_main:
        print()
    return 0


def run_terminal(chat, group: Group, opts, log, images=None) -> int:
    params = sampling(opts)
    if group.is_main:
        print(f"Chat ({HELP}).", flush=True)
        if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive escaped, not as an exception
            sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        line = None
        if group.is_main:
            try:
                line, changed = as_valid_text(input("you> "))
            except EOFError:  # Ctrl-D
                print()
                line, changed = "/quit", False
            except KeyboardInterrupt:
                print()
                continue
            except UnicodeDecodeError:  # a stdin that cannot be reconfigured
                line, changed = "", True
            if changed:
                log(f"warning: {NOT_UTF8}")
        line = group.share(line).strip()
        if line in ("/quit", "/exit"):
            return 0
        if line == "/clear":
            chat.clear()
            log("(conversation cleared)")
            continue
        if line.startswith("/"):
            log(f"unknown command {line.split()[0]!r}; {HELP}" if line != "/help" else HELP)
            continue
        if not line:
            log(f"(empty message: type something; {HELP})")
            continue
        reply = answer(chat, (chat.turns, line, params), images)
        for note in reply.notes:
            log(f"warning: {note}")
        if group.is_main:
            print("assistant> ", end="", flush=True)
        try:
            for delta in reply:
                if group.is_main:
                    print(delta, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            reply.close()
            print(" [stopped]", end="")
        if group.is_main:
            print(flush=True)


def run_follower(chat, group: Group) -> int:
    """Ranks > 0 behind the web page: generate each request rank 0 shares, until it shares None."""
    while (request := group.share(None)) is not None:
        try:
            reply = answer(chat, request)
            reply.close()  # generates: a request decode refuses raises here, before any collective step
        except ValueError:
            continue  # rank 0 refused it too, and waits for the next request
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = resolve_paths(parse_args(argv))  # before the heavy imports: a missing model is reported at once
    import logging

    from util.cli import process_groups, setup_logging
    from util.dist import local_device
    from util.generate import Chat

    setup_logging(logging.WARNING)
    with process_groups():
        # --device cpu on a GPU machine: gloo, since nccl cannot carry CPU tensors
        group = Group(opts.model_parallel_size, backend="gloo" if (opts.device or "").startswith("cpu") else None)
        device = opts.device or str(local_device())  # this rank's GPU among the visible ones, else the CPU

        def log(msg: str) -> None:  # status lines go to stderr so that --prompt's stdout is only the answer
            if group.is_main:
                print(msg, file=sys.stderr, flush=True)

        model, tokenizer = load(opts, device, log)
        if opts.max_new_tokens is None:
            opts.max_new_tokens = min(128, model.args.max_seq_len // 4)
        sampling(opts)  # bad sampling values are reported before the chat starts
        images = image_of(opts.image, model)
        chat = Chat(model, tokenizer, raw=opts.raw, chat_format=opts.chat_format)
        if chat.format is not None:
            log(f"chat format: {chat.format.name} (tokenizer {tokenizer.kind}: {tokenizer.path})")
        if opts.prompt is not None:
            return run_prompt(chat, group, opts, log, images)
        if not opts.web:
            return run_terminal(chat, group, opts, log, images)
        if not group.is_main:
            return run_follower(chat, group)
        try:
            web(chat, group, opts, log)
        finally:
            group.share(None)  # the other ranks stop waiting
        return 0


def image_of(path: Path | None, model):
    """--image as the model's input batch of one, or None."""
    if path is None:
        return None
    if not is_multimodal(model):
        raise ValueError(
            f"--image {path}: this model is text-only (no visual_backbone in its config); use a multimodal model "
            "or drop --image"
        )
    from util.images import load_image

    return load_image(path, model.visual.preprocess).unsqueeze(0)


# --- the web page ---


def read_image(path: str | Path):
    """The multimodal hook's input: an RGB image, or a ValueError saying what is wrong with the file (anything
    Pillow refuses, or a picture too large: util.images.open_image)."""
    from util.images import ImageError, open_image

    try:
        with open_image(path) as im:
            return im.convert("RGB")
    except ImageError as e:
        raise ValueError(f"could not read the image {Path(path).name}: {e.reason}") from None


def is_multimodal(model) -> bool:
    return getattr(model, "visual", None) is not None


def web(chat, group: Group, opts, log) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a local demo
    import gradio as gr

    from util.generate import SamplingParams

    model, max_seq_len = chat.model, chat.model.args.max_seq_len
    multimodal = is_multimodal(model)

    def respond(message, history, image, temperature, top_p, top_k, max_new_tokens, repetition_penalty):
        history = list(history or [])
        message, changed = as_valid_text((message or "").strip())
        if not message:
            yield history, "", "Empty message: type something first."
            return
        images = None
        if image is not None:
            try:
                read_image(image)
            except ValueError as e:
                yield history, message, str(e)
                return
            if not multimodal:
                yield history, message, "This model takes no images: remove the image and send again."
                return
            from util.images import load_image

            images = load_image(image, model.visual.preprocess).unsqueeze(0)
        try:
            params = SamplingParams(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                repetition_penalty=float(repetition_penalty),
                seed=opts.seed,
                draft_tokens=opts.draft_tokens,
            )
        except ValueError as e:
            yield history, message, str(e)
            return
        turns = turns_of(history)
        reply = answer(chat, group.share((turns, message, params, images)))
        status = " ".join(f"Note: {n}." for n in [*reply.notes, *([NOT_UTF8] if changed else [])])
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, "", status
        try:
            for _ in reply:
                history[-1] = {"role": "assistant", "content": reply.text}
                yield history, "", status
        finally:
            reply.close()  # a closed page stops the answer (model parallel: after the other ranks finish)
        if not reply.text.strip():
            history[-1] = {"role": "assistant", "content": "(no answer: the model ended at once)"}
            yield history, "", status

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace"])
    with gr.Blocks(title="lazyllama chat") as page:
        gr.Markdown(
            f"### lazyllama chat\n{', '.join(map(str, opts.pretrained_path or ['random weights']))} - "
            f"{opts.quant}, {opts.dtype}, context {max_seq_len} tokens"
        )
        chatbot = gr.Chatbot(elem_id="chatbot", height=380, label="Conversation")
        with gr.Row():
            box = gr.Textbox(
                elem_id="message",
                placeholder="Type a message and press Enter",
                show_label=False,
                scale=8,
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            clear = gr.Button("Clear", elem_id="clear", scale=1)
        # shown only for models that take images (a visual_backbone); read_image checks the file first
        image = gr.File(label="Image", file_types=["image"], visible=multimodal, elem_id="image")
        status = gr.Markdown(elem_id="status")
        with gr.Accordion("Sampling", open=True):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=opts.temperature, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=opts.top_p, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=opts.top_k, step=1, label="Top-k (0: all)")
            with gr.Row():
                max_new = gr.Slider(
                    1,
                    max_seq_len - 1,
                    value=min(opts.max_new_tokens, max_seq_len - 1),
                    step=1,
                    label="Max new tokens",
                )
                penalty = gr.Slider(1, 2, value=opts.repetition_penalty, step=0.05, label="Repetition penalty (1: off)")
        inputs = [box, chatbot, image, temperature, top_p, top_k, max_new, penalty]
        outputs = [chatbot, box, status]
        send.click(respond, inputs, outputs, api_name="respond", show_progress="minimal")
        box.submit(respond, inputs, outputs, api_visibility="undocumented", show_progress="minimal")
        clear.click(lambda: ([], "", None), None, [chatbot, status, image], api_visibility="undocumented")

    page.queue(default_concurrency_limit=1)  # one model: one answer at a time, the others wait in the queue
    log(f"serving on http://{opts.host}:{opts.port} (Ctrl-C stops)")
    page.launch(
        server_name=opts.host,
        server_port=opts.port,
        show_error=True,
        quiet=True,
        theme=theme,
        footer_links=[],
        ssr_mode=False,
    )


def turns_of(history: list[dict]) -> list[tuple[str, str]]:
    """(human, assistant) pairs from the Chatbot's messages."""
    turns, human = [], None
    for m in history:
        content = m["content"]
        if not isinstance(content, str):  # Gradio 6: a list of parts; the text parts are the message
            parts = content if isinstance(content, list) else [content]
            content = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        if m["role"] == "user":
            human = content
        elif human is not None:
            turns.append((human, content))
            human = None
    return turns


if __name__ == "__main__":
    from util.cli import run

    sys.exit(run(main))
