"""The gradio page of ``diffblend app``: controls wired to :mod:`.callbacks` / :mod:`.fronts` (UI glue only).

Security: the page has no file inputs and the app serves no folder of this machine (gradio serves
its own generated images only; ``allowed_paths`` stays empty and uploads are capped at 1 kB), and
it binds 127.0.0.1 unless the user passes another host.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool

import gradio as gr  # noqa: E402

from . import callbacks as cb  # noqa: E402
from . import fronts  # noqa: E402

__all__ = ["build_app", "launch"]

_CSS = "#rewards table {font-size: 0.85em}"


def _page_errors(fn: Callable) -> Callable:
    """Errors the user can cause (the library's ValueError, an unknown name) become a message in the page."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, KeyError) as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise gr.Error(message, print_exception=False) from None  # the page shows it; no server traceback
    return wrapped


def _shown(view: cb.View, labels: list[str]) -> tuple:
    return (list(zip(view.images, view.captions)), cb.reward_table(view.scores, labels),
            f"generated in {view.seconds:.2f} s")


def _main_panel(session: cb.Session) -> tuple[list, list, dict]:
    """The controls (weights, lambda, method, prompt, seed, steps, guidance) and the image panel."""
    names = session.adapter_names
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            sliders = [gr.Slider(0, 1, value=round(1 / len(names), 2), step=0.01, label=f"w: {n}") for n in names]
            used = gr.Markdown(elem_id="used-weights")
            lam = gr.Slider(0, 2, value=1.0, step=0.05, label="KL strength lambda (1 = DB-MPA; LS needs <= 1)")
            method = gr.Radio(list(cb.METHOD_LABELS), value="DB-MPA", label="method")
            prompt = gr.Textbox(session.prompt, label="prompt")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed", minimum=0)
                count = gr.Slider(1, 8, value=1, step=1, label="images")
            steps = gr.Slider(1, 50, value=20, step=1, label="steps")
            guidance = gr.Slider(1, 10, value=session.guidance_scale, step=0.5, label="guidance")
            live = gr.Checkbox(True, label="update live while dragging (else on release)")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="images", columns=4, height="auto", format="png", elem_id="main-gallery", preview=False,
                                 interactive=False, allow_preview=False)
            rewards = gr.Markdown(elem_id="rewards")
            timing = gr.Markdown(elem_id="timing")
    return sliders, [lam, method, prompt, seed, steps, guidance, count], {
        "used": used, "live": live, "gallery": gallery, "rewards": rewards, "timing": timing}


def _wire_main(session: cb.Session, sliders: list, controls: list, out: dict, demo: gr.Blocks) -> None:
    m = len(sliders)

    @_page_errors
    def update(*values, progress=gr.Progress(track_tqdm=True)):
        w, rest = values[:m], values[m:]
        view = cb.generate_view(session, w, *rest)
        return (*_shown(view, [c.split(" | ")[0] for c in view.captions]), cb.weights_text(view.weights))

    def when(live_wanted: bool) -> Callable:
        """A weight slider's handler: dragging (input events) updates when live, release when not live;
        with always_last the latest value of a drag is always rendered, so release adds nothing then."""
        def handler(live, *values, progress=gr.Progress(track_tqdm=True)):
            return update(*values) if bool(live) == live_wanted else (gr.skip(),) * 4
        return handler

    inputs = [*sliders, *controls]
    outputs = [out["gallery"], out["rewards"], out["timing"], out["used"]]
    for s in sliders:
        s.input(when(True), [out["live"], *inputs], outputs, trigger_mode="always_last", show_progress="hidden")
        s.release(when(False), [out["live"], *inputs], outputs, show_progress="minimal")
    lam, method, prompt, seed, steps, guidance, count = controls
    for c in (lam, steps, guidance, count):
        c.release(update, inputs, outputs, show_progress="minimal")
    for ev in (method.change, prompt.submit, seed.change):
        ev(update, inputs, outputs, show_progress="minimal")
    demo.load(update, inputs, outputs)


def _strip_tab(session: cb.Session, controls: list) -> None:
    names = session.adapter_names
    lam, method, prompt, seed, steps, guidance, _ = controls
    with gr.Row():
        a = gr.Dropdown(names, value=names[0], label="from adapter (w = 0)")
        b = gr.Dropdown(names, value=names[min(1, len(names) - 1)], label="to adapter (w = 1)")
        points = gr.Slider(2, 9, value=5, step=1, label="points")
        go = gr.Button("Generate strip (one batched call)", elem_id="strip-button")
    gallery = gr.Gallery(label="strip: the same seed along w", columns=9, height=220, format="png",
                         elem_id="strip-gallery", interactive=False)
    rewards = gr.Markdown(elem_id="strip-rewards")
    timing = gr.Markdown()

    @_page_errors
    def strip(a, b, points, lam, method, prompt, seed, steps, guidance, progress=gr.Progress(track_tqdm=True)):
        view = cb.strip_view(session, a, b, points, lam, method, prompt, seed, steps, guidance)
        return _shown(view, [c.split(" | ")[0] for c in view.captions])

    go.click(strip, [a, b, points, lam, method, prompt, seed, steps, guidance], [gallery, rewards, timing])


def _records_tab(session: cb.Session, controls: list) -> None:
    from ..evaluate.analysis import reward_names

    names = reward_names(session.records)
    steps, guidance = controls[4], controls[5]
    with gr.Row():
        x = gr.Dropdown(names, value=names[0], label="x reward")
        y = gr.Dropdown(names, value=names[min(1, len(names) - 1)], label="y reward")
    plot = gr.Plot(label="Pareto fronts (mean rewards per setting, 95% CI)")
    point = gr.Dropdown([], label="choose a point (front points first)", elem_id="front-point")
    text = gr.Markdown()
    gallery = gr.Gallery(label="its images, regenerated", columns=4, height=220, format="png", interactive=False)
    rewards = gr.Markdown()

    @_page_errors
    def redraw(x, y):
        choices = fronts.front_choices(session.records, x, y)
        return fronts.front_figure(session.records, x, y), gr.Dropdown(choices=choices, value=None)

    @_page_errors
    def show(setting, steps, guidance, progress=gr.Progress(track_tqdm=True)):
        if not setting:
            return gr.skip(), gr.skip(), gr.skip()
        txt, view = fronts.point_view(session, setting, steps, guidance)
        return txt, list(zip(view.images, view.captions)), cb.reward_table(view.scores, [f"#{j}" for j in
                                                                                        range(len(view.images))])

    for ev in (x.change, y.change):
        ev(redraw, [x, y], [plot, point])
    point.change(show, [point, steps, guidance], [text, gallery, rewards])
    return redraw, [x, y], [plot, point]


def build_app(session: cb.Session) -> gr.Blocks:
    """The page: blend controls and images with their rewards, a strip across w, and (with records) the fronts."""
    with gr.Blocks(title="diffblend") as demo:
        gr.Markdown("## Diffusion Blend: blend reward-aligned adapters at inference time\n"
                    "Move a weight slider: the weights are renormalised to sum to 1 (shown below the sliders) "
                    "and the images are regenerated with the same seeds. Rewards: higher is better for each.")
        sliders, controls, out = _main_panel(session)
        _wire_main(session, sliders, controls, out, demo)
        with gr.Tab("Strip across w"):
            _strip_tab(session, controls)
        if session.records:
            with gr.Tab("Pareto fronts of a sweep"):
                redraw, ins, outs = _records_tab(session, controls)
            demo.load(redraw, ins, outs)
    return demo


def launch(session: cb.Session, host: str = "127.0.0.1", port: int | None = None, *, block: bool = True,
           quiet: bool = False) -> gr.Blocks:
    """Serve the page on ``host:port`` (127.0.0.1 by default: only this machine; "0.0.0.0" exposes it to the
    network, the user's explicit choice). With ``block=False`` returns at once (``demo.close()`` stops it)."""
    demo = build_app(session)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, show_error=False,
                allowed_paths=[], max_file_size="1kb", ssr_mode=False, css=_CSS, footer_links=[])
    return demo
