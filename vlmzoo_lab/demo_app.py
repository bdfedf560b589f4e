"""``scripts/demo.py``: the web demo (Gradio) on top of :class:`vlmzoo_lab.demo.DemoBackend`.

One page: an image (upload, or one of the run's evaluation images as examples), a question, and one
column per model with its conversation (streamed), its strategy name, visual-token count and
latency, the attention heat map of its last answer and, where the strategy returns per-image
extras, their bar chart. Served on 127.0.0.1 by default; the page loads nothing from outside the
server (Gradio's bundled fonts and scripts), and Gradio's usage analytics are switched off.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

# Gradio reads this when it is imported: no usage analytics, no version check against its servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import transformers

from vlmzoo.chat import GenerationSettings, ModelFolderError

from .demo import DemoBackend, DemoUpdate, Example, folder_examples, load_models, run_examples

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_app(backend: DemoBackend) -> "gr.Blocks":
    """The page; element ids (``image``, ``question``, ``ask``, ``clear``, ``status``, ``chat-i``,
    ``stats-i``, ``note-i``, ``heatmap-i``, ``extras-i`` for model i) let tests and scripts drive it."""
    import gradio as gr

    models = backend.models
    with gr.Blocks(title="vlmzoo demo", analytics_enabled=False) as app:
        state = gr.State(None)
        gr.Markdown("## vlmzoo: strategies side by side\nThe same image and question go to every model; each keeps "
                    "its own conversation (ask follow-ups; a new image starts over). Under each answer: where the "
                    "answer looked (attention to the image tokens) and the strategy's own outputs.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=240,
                                 elem_id="image")
                question = gr.Textbox(label="Question", placeholder="e.g. What colour is the circle?", lines=1,
                                      elem_id="question")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown("", elem_id="status")
                if backend.examples:
                    gr.Examples([[str(e.image), e.question] for e in backend.examples], inputs=[image, question],
                                label="Examples (the run's evaluation images)", examples_per_page=8)
            chats, stats, notes, heatmaps, extras = [], [], [], [], []
            for i, entry in enumerate(models):
                with gr.Column(scale=2, min_width=280):
                    gr.Markdown(f"### {entry.strategy}\n`{entry.short_folder}`", elem_id=f"name-{i}")
                    chats.append(gr.Chatbot(label=entry.strategy, show_label=False, render_markdown=False, height=200,
                                            feedback_options=None, elem_id=f"chat-{i}"))
                    stats.append(gr.Markdown(f"{entry.num_visual_tokens} visual tokens", elem_id=f"stats-{i}"))
                    notes.append(gr.Markdown("", elem_id=f"note-{i}"))
                    # The pictures carry their own titles (the answer, its share of attention on the image).
                    heatmaps.append(gr.Image(label="attention of the answer to the image", show_label=False,
                                             interactive=False, height=330, visible=entry.has_grids,
                                             elem_id=f"heatmap-{i}"))
                    extras.append(gr.Image(label="strategy extras", show_label=False, interactive=False, visible=False,
                                           elem_id=f"extras-{i}"))
        outputs = [state, status, *chats, *stats, *notes, *heatmaps, *extras]

        def on_ask(current: Any, image_path: str | None, text: str) -> Any:
            for update in backend.ask(current, image_path, text):
                yield page_values(update)

        def on_clear(current: Any) -> Any:
            fresh = backend.new_state()
            return page_values(DemoUpdate(fresh, "New conversation.", fresh["panels"], frozenset(range(len(models)))))

        # One answer round at a time across both triggers: the models are shared by every visitor, and the
        # attention pass switches a model's LLM to eager attention while it runs.
        ask.click(on_ask, [state, image, question], outputs, concurrency_limit=1, concurrency_id="answer")
        question.submit(on_ask, [state, image, question], outputs, concurrency_limit=1, concurrency_id="answer")
        clear.click(on_clear, [state], outputs)
    return app


def page_values(update: DemoUpdate) -> list[Any]:
    """A :class:`DemoUpdate` as the values of ``[state, status, chats, stats, notes, heatmaps, extras]``;
    a picture is sent only when it changed (Gradio writes each one sent to its cache folder)."""
    import gradio as gr

    panels, changed = update.panels, update.images_changed
    heat = [p.heatmap if i in changed else gr.skip() for i, p in enumerate(panels)]
    bars = [gr.update(value=p.extras, visible=p.extras is not None, label=", ".join(p.extras_values) or "strategy extras")
            if i in changed else gr.skip() for i, p in enumerate(panels)]
    return [update.state, update.status, *[p.chat for p in panels], *[p.stats for p in panels],
            *[p.note for p in panels], *heat, *bars]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Web demo: several saved models answer the same image and question side by side, with where "
        "each answer looked.")
    parser.add_argument("--models", nargs="+", required=True, metavar="DIR",
                        help="saved model folders (e.g. <run>/<stage>/final), one column each")
    parser.add_argument("--examples", metavar="DIR",
                        help="a folder of example images (default: the evaluation images of the first model's run)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to serve on (default: {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--template", help="conversation template other than the saved processors'")
    gen = parser.add_argument_group("generation (as transformers' generate; greedy unless --do-sample)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    return parser


def prepare(argv: Sequence[str] | None = None) -> tuple[DemoBackend, argparse.Namespace]:
    """Parse ``argv`` and load the models and examples; bad input raises ``ModelFolderError`` / ``FileNotFoundError``."""
    args = build_parser().parse_args(argv)
    models = load_models(args.models, args.template)
    if args.examples:
        examples: list[Example] = folder_examples(args.examples)
    else:
        examples = next((found for found in map(run_examples, args.models) if found), [])
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return DemoBackend(models, settings, examples), args


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/demo.py``: load the models, then serve the page until interrupted."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        backend, args = prepare(argv)
    except (ModelFolderError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"vlmzoo demo: {', '.join(m.strategy for m in backend.models)} on http://{args.host}:{args.port}")
    serve(backend, args.host, args.port)
    return 0


def serve(backend: DemoBackend, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True) -> "gr.Blocks":
    """Build the page and serve it on ``host:port``; ``block=False`` returns
    at once with the server running in a thread (``app.close()`` stops it)."""
    app = build_app(backend)
    allowed = {str(e.image.parent) for e in backend.examples} | {str(e.high_res.parent) for e in backend.examples if e.high_res}
    app.queue().launch(server_name=host, server_port=port, allowed_paths=sorted(allowed),
                                                  share=False, ssr_mode=False, show_error=True, quiet=not block,
                                                  prevent_thread_lock=not block)
    return app
