"""Blocks wiring only: components, layout and events. Behaviour lives in app.handlers (one module per concern).

Public API endpoints (gradio_client): `generate`, `inpaint`, `variations` and `search`; every UI-only
event is private.
Generation runs in the queue with concurrency 1 (shared with model switching); Stop and the
slider helpers run outside the queue so they answer while a job runs. Generation handlers are
async generators over a worker thread (app.jobs), so a client's cancel or a closed page stops the
decoding within one step, and the queue slot is freed only once it has.

Refusals that still come from Gradio/FastAPI, before any handler (none lists components or
object addresses): a body that is not Gradio's JSON shape (HTTP 422, pydantic's JSON detail), an
unknown session (HTTP 400 "Session hash not found."), an unknown fn_index (HTTP 500), an upload
over MAX_UPLOAD_BYTES ("... exceeds the maximum file size of 20971520 bytes").
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from dream_core.request import (APP_DEFAULT_CANDIDATES, APP_MAX_CANDIDATES, GUIDANCE_SCHEDULES, HEAD_SAMPLERS,
                                MAX_GUIDANCE_SCALE, MAX_IMAGES, MAX_SEED, MAX_TEMPERATURE, request_defaults)

from . import handlers as h
from .history import History
from .images import MAX_UPLOAD_BYTES, check_image_size, header_size, remove_leftovers
from .jobs import iterate_in_thread
from .models import ModelManager

TITLE = "DREAM Studio"
#: Searches that run at once (all clients): a search in an embedded bank takes milliseconds, so
#: one client's caption file, embedded for seconds (see dream_core.retrieval),
#: never holds up the others' searches.
SEARCH_CONCURRENCY = 4

CSS = """
.pixelated img { image-rendering: pixelated; }
.ds-status { padding: 2px 0 4px 0; }
.ds-track { height: 10px; background: var(--neutral-200, #e5e7eb); border-radius: 5px; overflow: hidden; }
.ds-fill { height: 100%; background: var(--color-accent, #f97316); transition: width 0.12s linear; }
.ds-done .ds-fill { background: #16a34a; }
.ds-stopped .ds-fill, .ds-stopping .ds-fill { background: #9ca3af; }
.ds-text { margin-top: 6px; font-size: 0.95em; }
.ds-banner-missing { border: 1px solid #f59e0b; background: #fffbeb; color: #78350f; border-radius: 8px; padding: 8px 12px; }
.ds-banner-ok { color: var(--body-text-color-subdued, #6b7280); }
#ds-generate { min-height: 44px; }
.ds-heading p { margin: 0 0 -4px 2px; font-size: 0.92em; }
#ds-search-img img, #ds-png-in img { width: 100%; height: 100%; object-fit: contain; }
"""

# Ctrl+Enter (Cmd+Enter) in the Generate controls clicks Generate; multi-line prompts keep Enter for newlines.
HEAD = """
<script>
document.addEventListener('keydown', function (e) {
  if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') {
    var panel = e.target && e.target.closest ? e.target.closest('#ds-controls') : null;
    var btn = document.querySelector('#ds-generate');
    if (panel && btn) { e.preventDefault(); btn.click(); }
  }
});
</script>
"""


class StudioBlocks(gr.Blocks):
    """gr.Blocks whose refusal of a request with too few input values (raw HTTP `data: []`) is one
    readable sentence naming the endpoint's inputs, instead of Gradio's list of component objects.

    The public endpoints also refuse extra values (Gradio ignores them) and a value where the
    session state goes (Gradio drops it): a client that leaves out the state's null and sends one
    extra value would otherwise have every argument read as the one before it."""

    def validate_inputs(self, block_fn, inputs: list[Any]) -> None:
        names = [("session state (send null)" if isinstance(b, gr.State) else str(getattr(b, "label", None)
                  or b.get_block_name())) for b in block_fn.inputs]
        endpoint = f"/{block_fn.api_name}" if block_fn.api_name else "this event"
        count = f"{endpoint} takes {len(names)} input values ({', '.join(names)}); the request sent {len(inputs)}"
        try:
            super().validate_inputs(block_fn, inputs)
        except ValueError:
            raise h.fail(count) from None
        if block_fn.api_visibility != "public":
            return
        if len(inputs) > len(names):
            raise h.fail(count)
        for i, block in enumerate(block_fn.inputs):
            if isinstance(block, gr.State) and inputs[i] is not None:
                raise h.fail(f"{endpoint}: value {i + 1} is the session state: send null there, then "
                             f"{', '.join(n for n in names if not n.startswith('session state'))}")


def CheckedImage(**kwargs) -> gr.Image:  # noqa: N802 - reads like the component it returns
    """gr.Image whose upload step turns unreadable files into a clear message instead of a PIL
    traceback, and refuses an image too large by the size its header declares, before Gradio
    decodes it (sizes and pixels are checked again in the handlers). The instance's preprocess is
    wrapped rather than subclassed: a Component subclass makes Gradio write a .pyi beside us.
    The file reaches the handler as uploaded (image_mode None): Gradio's own conversion to RGB
    would drop a mask's alpha and clip 16-bit greyscale to white; app.images reads it instead."""
    kwargs.setdefault("image_mode", None)
    image = gr.Image(**kwargs)
    preprocess = image.preprocess

    def checked(payload):
        name = getattr(payload, "orig_name", None) or "the file"
        try:
            if payload is not None:
                url = getattr(payload, "url", None) or ""
                if url.startswith("data:"):
                    source = io.BytesIO(base64.b64decode(url.split(",", 1)[-1]))
                else:
                    source = getattr(payload, "path", None)
                if source is not None:
                    check_image_size(*header_size(source))
            return preprocess(payload)
        except ValueError as err:
            if "too large" in str(err):
                raise h.fail(f"{name}: {err}") from None
            raise h.fail(f"{name} is not an image this app can read (PNG, JPEG, WebP, GIF, BMP)") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError):
            raise h.fail(f"{name} is not an image this app can read (PNG, JPEG, WebP, GIF, BMP)") from None

    image.preprocess = checked  # type: ignore[method-assign]
    return image


def as_sent(component: gr.components.Component) -> gr.components.Component:
    """The component's value reaches the handler as the client sent it: Gradio's own preprocess
    would round a Number (2.5 -> 2), fail on "four" or NaN with a list of components, or refuse a
    Dropdown value without naming the field; the handler's validation names the field instead."""
    component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return component


def WholeNumber(**kwargs) -> gr.Number:  # noqa: N802
    """gr.Number(precision=0) (typed "integer" in the API) whose value is never rounded."""
    return as_sent(gr.Number(precision=0, **kwargs))


def _skip(value: Any) -> Any:
    return gr.skip() if value is None else value


def _examples(ctx: h.AppContext) -> gr.Dataset:
    """The loaded model's example prompts (hidden for a model without examples.txt)."""
    prompts = ctx.manager.examples()
    return gr.Dataset(samples=[[p] for p in prompts], visible=bool(prompts))


def _banner(ctx: h.AppContext) -> str:
    m = ctx.manager
    if m.pipe is None:
        text = re.sub(r"'([^']+)'", r"<code>\1</code>", html.escape(m.error or "No model loaded.", quote=False))
        return f'<div class="ds-banner-missing">⚠ {text}</div>'
    c = m.pipe.config
    return (f'<div class="ds-banner-ok">Model <b>{html.escape(m.name)}</b> on {m.pipe.device} · '
            f'{c.image_size}×{c.image_size} px · {c.seq_len} tokens</div>')


def build_app(model: str | Path | None = None, *, models_dirs: list[Path] | None = None, device: str = "auto",
              outputs_dir: str | Path | None = None, shared_history: bool = True,
              context: h.AppContext | None = None) -> gr.Blocks:
    """The DREAM Studio Blocks app. Launch it with `launch_app(demo, ...)` (CSS, head script and
    allowed paths travel with it). Layout per tab (`_*_tab`), then the events (`_wire_*`)."""
    if context is None:
        manager = ModelManager(model, models_dirs, device=device).load_initial()
        context = h.AppContext(manager, History(outputs_dir), shared_history=shared_history)
    ctx = context
    controls = h.default_controls(ctx)  # ranges and defaults that depend on the loaded model
    controls["examples"] = ctx.manager.examples()
    defaults = request_defaults()  # the engine's defaults; every limit comes from dream_core.request

    with StudioBlocks(title=TITLE, delete_cache=(600, 3600)) as demo:
        ui = SimpleNamespace(session=gr.State(h.SessionState()),
                             picked=gr.State(None))  # the record chosen in History (or read from a dropped PNG)
        gr.Markdown(f"# {TITLE}\nDREAM decodes **K candidates** at once, scores them with its own encoder "
                    "early in decoding (Semantically Aligned Decoding), and finishes only the best one.")
        ui.banner = gr.HTML(_banner(ctx))
        ui.demo = demo
        with gr.Tabs() as tabs:
            for part in (_generate_tab(controls, defaults), _edit_tab(controls, defaults), _history_tab(), _search_tab(), _model_tab(ctx)):
                vars(ui).update(vars(part))
        ui.tabs = tabs
        vars(ui).update(vars(_api_components(controls, defaults)))
        ui.gen_controls = [ui.prompt, ui.negative, ui.k, ui.decision, ui.steps, ui.head_steps, ui.head_sampler, ui.cfg,
                           ui.schedule, ui.temperature, ui.seed, ui.randomize, ui.n_images]
        for wire in (_wire_generate, _wire_edit, _wire_history, _wire_search, _wire_model, _wire_api,
                     _wire_page_load):
            wire(ctx, ui, controls, defaults)

    demo.queue(default_concurrency_limit=1)
    demo.dream_context = ctx  # type: ignore[attr-defined]
    return demo


# ----- layout, one function per tab -----
def _generate_tab(controls: dict, defaults: dict) -> SimpleNamespace:
    """The Generate tab: controls on the left, live candidates and the result on the right."""
    with gr.Tab("Generate", id="generate"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=340, elem_id="ds-controls"):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="ds-prompt",
                                    placeholder="a large red circle in the middle on a white background",
                                    info="Ctrl+Enter generates")
                examples = gr.Dataset(components=[prompt], samples=[[e] for e in controls["examples"]], type="values",
                                      label="Examples (from the model's examples.txt)", elem_id="ds-examples",
                                      visible=bool(controls["examples"]), samples_per_page=12)
                negative = gr.Textbox(label="Negative prompt (optional)", lines=1,
                                      placeholder="replaces the empty prompt in classifier-free guidance")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", scale=3, elem_id="ds-generate")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="ds-stop")
                k = gr.Slider(1, APP_MAX_CANDIDATES, value=APP_DEFAULT_CANDIDATES, step=1, label="Candidates (K)",
                              info="decoded together; all but the best are pruned at the decision step")
                steps = gr.Slider(1, controls["seq_len"], value=controls["steps"], step=1, label="Decoding steps",
                                  info=f"at most one step per token ({controls['seq_len']} tokens)")
                decision = gr.Slider(1, max(2, controls["steps"] - 1), value=controls["decision"], step=1,
                                     label="Decision step")
                decision_md = gr.Markdown(h.decision_info(controls["steps"], controls["decision"], controls["seq_len"],
                                                          APP_DEFAULT_CANDIDATES), elem_id="ds-decision-info")
                with gr.Row():
                    seed = WholeNumber(label="Seed", value=0, minimum=0, maximum=MAX_SEED,
                                     interactive=False, scale=2)
                    randomize = gr.Checkbox(label="Random seed", value=True, scale=1)
                    reuse_btn = gr.Button("♻ Reuse last seed", size="sm", scale=1)
                n_images = gr.Slider(1, MAX_IMAGES, value=defaults["num_images"], step=1, label="Images",
                                     info="image i uses seeds seed + i·K …")
                with gr.Accordion("Sampling", open=False):
                    cfg = gr.Slider(0.0, MAX_GUIDANCE_SCALE, value=controls["guidance_scale"], step=0.1,
                                    label="CFG scale")
                    schedule = gr.Radio(list(GUIDANCE_SCHEDULES), value=defaults["guidance_schedule"],
                                        label="CFG schedule",
                                        info="linear ramps guidance up as tokens get decided")
                    temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=controls["temperature"], step=0.05,
                                            label="Temperature")
                    head_steps = gr.Slider(1, controls["head_steps_max"], value=controls["head_steps"], step=1,
                                           label="Diffusion-head steps",
                                           info="denoising steps of the per-token head at every decoding step")
                    head_sampler = gr.Dropdown(list(HEAD_SAMPLERS), value=controls["head_sampler"],
                                               label="Diffusion-head sampler",
                                               info="ancestral: as trained; ddim, dpm-solver++: deterministic, "
                                                    "meant for fewer head steps")
                preview_mode = gr.Radio(list(h.PREVIEW_MODES), value=h.PREVIEW_MARKED, label="Live view",
                                        info="hatched = not decided yet; partial decode = the VAE's view "
                                             "of the half-filled latent")
            with gr.Column(scale=2, min_width=480):
                status = gr.HTML(h.progress_html(0.0, "Ready."), elem_id="ds-status")
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=300):
                        gr.Markdown("**Candidates** (live) · hatched patches are tokens not decided yet",
                                    elem_classes="ds-heading")
                        grid = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                        buttons=["fullscreen"], elem_id="ds-grid", elem_classes="pixelated",
                                        height=440)
                    with gr.Column(min_width=300):
                        gr.Markdown("**Result** · saved as PNG with its parameters", elem_classes="ds-heading")
                        final = gr.Image(show_label=False, type="filepath", format="png", interactive=False,
                                         buttons=["download", "fullscreen"], elem_id="ds-final",
                                         elem_classes="pixelated", height=440)
                        download = gr.DownloadButton("Download PNG (with parameters)", visible=False,
                                                     elem_id="ds-download", size="md")
                        to_edit_btn = gr.Button("Edit this result", size="sm")
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=300):
                        gr.Markdown("**Scores at the decision step** · the model's own image-text similarity",
                                    elem_classes="ds-heading")
                        scores_plot = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                               buttons=[], elem_id="ds-scores", height=260)
                    with gr.Column(min_width=300):
                        infotext = gr.Textbox(label="Parameters (stored in the PNG)", lines=5,
                                              interactive=False, buttons=["copy"], elem_id="ds-infotext")
                run_gallery = gr.Gallery(label="This run", columns=4, height=220, visible=False,
                                         elem_classes="pixelated", format="png",
                                         buttons=["download", "fullscreen"])
    return SimpleNamespace(prompt=prompt, negative=negative, gen_btn=gen_btn, stop_btn=stop_btn, k=k, steps=steps,
                           decision=decision, decision_md=decision_md, seed=seed, randomize=randomize,
                           reuse_btn=reuse_btn, n_images=n_images, cfg=cfg, schedule=schedule,
                           temperature=temperature, head_steps=head_steps, head_sampler=head_sampler,
                           preview_mode=preview_mode, status=status,
                           grid=grid, final=final, download=download, scores_plot=scores_plot, infotext=infotext,
                           run_gallery=run_gallery, to_edit_btn=to_edit_btn, examples=examples)


def _edit_tab(controls: dict, defaults: dict) -> SimpleNamespace:
    """The Edit tab: a source image with a painted mask (or a strength), the same live candidates."""
    with gr.Tab("Edit", id="edit"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=340):
                editor = gr.ImageEditor(label="Image · paint the region to regenerate", type="pil",
                                        sources=["upload", "clipboard"], image_mode="RGB", height=360,
                                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                        elem_id="ds-edit-editor")
                mode = gr.Radio([(h.EDIT_MODE_LABELS[m], m) for m in h.EDIT_MODES], value=h.EDIT_INPAINT,
                                label="Edit", info="every token the painted pixels touch is regenerated; the "
                                                   "rest is kept as the VAE encodes it")
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="the whole picture as it should be "
                                    "(variations: empty = the model's own caption of the image)")
                with gr.Row():
                    edit_btn = gr.Button("Edit", variant="primary", scale=3, elem_id="ds-edit")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1)
                k = gr.Slider(1, APP_MAX_CANDIDATES, value=APP_DEFAULT_CANDIDATES, step=1, label="Candidates (K)")
                decision = gr.Slider(0, max(1, controls["seq_len"] - 1), value=0, step=1,
                                     label="Decision step (0 = the model's default)",
                                     info="one decoding step per regenerated token; the decision must come "
                                          "before the last")
                strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Strength (variations)",
                                     info="share of the tokens regenerated, chosen by the seed")
                with gr.Row():
                    paste = gr.Checkbox(label="Paste the source back outside the regenerated patches", value=True)
                    explain = gr.Checkbox(label="Explain the decision (token overlay)", value=False)
                with gr.Row():
                    seed = WholeNumber(label="Seed", value=0, minimum=0, maximum=MAX_SEED, interactive=False,
                                       scale=2)
                    randomize = gr.Checkbox(label="Random seed", value=True, scale=1)
            with gr.Column(scale=2, min_width=480):
                status = gr.HTML(h.progress_html(0.0, "Ready."))
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=300):
                        gr.Markdown("**Candidates** (live) · kept tokens plain, regenerated ones hatched until "
                                    "decided; with Explain, green/red = the token raised/lowered the score",
                                    elem_classes="ds-heading")
                        grid = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                        buttons=["fullscreen"], elem_id="ds-edit-grid", elem_classes="pixelated",
                                        height=440)
                    with gr.Column(min_width=300):
                        gr.Markdown("**Result** · saved as PNG with its parameters and the source's SHA-256",
                                    elem_classes="ds-heading")
                        final = gr.Image(show_label=False, type="filepath", format="png", interactive=False,
                                         buttons=["download", "fullscreen"], elem_id="ds-edit-final",
                                         elem_classes="pixelated", height=440)
                        download = gr.DownloadButton("Download PNG (with parameters)", visible=False, size="md")
                with gr.Row(equal_height=False):
                    scores_plot = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                           buttons=[], height=260)
                    infotext = gr.Textbox(label="Parameters (stored in the PNG)", lines=5, interactive=False,
                                          buttons=["copy"], elem_id="ds-edit-infotext")
    return SimpleNamespace(editor=editor, edit_mode=mode, edit_prompt=prompt, edit_btn=edit_btn,
                           edit_stop_btn=stop_btn, edit_k=k, edit_decision=decision, edit_strength=strength,
                           edit_paste=paste, edit_explain=explain, edit_seed=seed, edit_randomize=randomize,
                           edit_status=status, edit_grid=grid, edit_final=final, edit_download=download,
                           edit_scores=scores_plot, edit_infotext=infotext)


def _history_tab() -> SimpleNamespace:
    """The History tab: past generations, their parameters, a PNG drop zone."""
    with gr.Tab("History", id="history"):
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("**Past generations**, newest first · click one to see its parameters",
                            elem_classes="ds-heading")
                history = gr.Gallery(show_label=False, columns=6, height=460,
                                     elem_classes="pixelated", elem_id="ds-history", format="png",
                                     allow_preview=True, buttons=["download", "fullscreen"])
                with gr.Row():
                    refresh_btn = gr.Button("Refresh", size="sm")
                    send_btn = gr.Button("Send to Generate", variant="primary", size="sm")
                    to_edit_btn = gr.Button("Send to Edit", size="sm")
                    to_search_btn = gr.Button("Search captions for this image", size="sm")
            with gr.Column(scale=2):
                picked_json = gr.JSON(label="Parameters of the selected (or dropped) image",
                                      elem_id="ds-picked")
                gr.Markdown("**Drop a PNG made by DREAM Studio** to read its parameters",
                            elem_classes="ds-heading")
                png_in = CheckedImage(show_label=False, type="filepath", sources=["upload", "clipboard"],
                                      height=200, elem_id="ds-png-in", elem_classes="pixelated")
                send_png_btn = gr.Button("Send these parameters to Generate", size="sm")
    return SimpleNamespace(history=history, refresh_btn=refresh_btn, send_btn=send_btn, to_search_btn=to_search_btn,
                           history_to_edit_btn=to_edit_btn,
                           picked_json=picked_json, png_in=png_in, send_png_btn=send_png_btn)


def _search_tab() -> SimpleNamespace:
    """The Reverse search tab: an image against the caption bank, a caption file or labels."""
    with gr.Tab("Reverse search", id="search"):
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("**Image**: upload, paste, or pick one in History", elem_classes="ds-heading")
                search_img = CheckedImage(show_label=False, type="filepath", sources=["upload", "clipboard"],
                                          height=300, elem_id="ds-search-img", elem_classes="pixelated")
                mode = gr.Radio([(h.SEARCH_MODE_LABELS[m], m) for m in h.SEARCH_MODES], value=h.SEARCH_BANK,
                                label="Search in")
                caption_file = gr.File(label="Caption bank: a .txt file, one caption per line (or caption<TAB>details)",
                                       file_types=[".txt"], type="filepath", visible=False)
                labels = gr.Textbox(label="Labels, one per line (or comma-separated)", lines=4,
                                    visible=False, placeholder="circle\nsquare\ntriangle")
                top_k = gr.Slider(1, 20, value=5, step=1, label="Top k")
                search_btn = gr.Button("Search", variant="primary", elem_id="ds-search")
            with gr.Column(scale=3):
                # Captions and their details (an emoji bank's: the emoji and its keywords) shown
                # whole and wrapped.
                results = gr.Dataframe(headers=list(h.SEARCH_COLUMNS), interactive=False,
                                       label="Best captions", elem_id="ds-results", wrap=True,
                                       column_widths=["8%", "38%", "12%", "42%"])
                results_note = gr.Markdown("")
                use_caption_btn = gr.Button("Use the best caption as the prompt", size="sm")
    return SimpleNamespace(search_img=search_img, mode=mode, caption_file=caption_file, labels=labels, top_k=top_k,
                           search_btn=search_btn, results=results, results_note=results_note,
                           use_caption_btn=use_caption_btn)


def _model_tab(ctx: h.AppContext) -> SimpleNamespace:
    """The Model tab: pick a model directory, its info and model card."""
    with gr.Tab("Model", id="model"):
        names = list(ctx.manager.choices())
        dirs = ", ".join(f"`{p}`" for p in ctx.manager.models_dirs)
        with gr.Row():
            found = f"model directories found in {dirs}" if names else \
                f"no model directory found yet in {dirs} (one holds config.json and model.safetensors)"
            model_dd = gr.Dropdown(names, value=ctx.manager.name if ctx.manager.name in names else None,
                                   label="Model", info=found, scale=3, elem_id="ds-model-dd")
            with gr.Column(scale=1, min_width=160):
                load_btn = gr.Button("Load", variant="primary")
                rescan_btn = gr.Button("Rescan folders", size="sm")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                model_info = gr.Markdown(ctx.manager.info_markdown(), elem_id="ds-model-info")
            with gr.Column(scale=3):
                gr.Markdown("**Model card**", elem_classes="ds-heading")
                card = gr.Markdown(h.model_card(ctx), elem_id="ds-model-card", container=True)

    return SimpleNamespace(model_dd=model_dd, load_btn=load_btn, rescan_btn=rescan_btn, model_info=model_info,
                           card=card)


def _api_components(controls: dict, defaults: dict) -> SimpleNamespace:
    """Hidden components carrying the typed public API (`generate`, `search`)."""
    with gr.Column(visible=False):
        # Text and numbers as sent: Gradio's own preprocess would turn 123 or ["a", "b"] into a
        # prompt and true into 1.0; the request refuses them by name instead.
        a_prompt = as_sent(gr.Textbox(label="prompt"))
        a_negative = as_sent(gr.Textbox(label="negative_prompt", value=""))
        a_k = WholeNumber(label="num_candidates", value=APP_DEFAULT_CANDIDATES)
        a_decision = WholeNumber(label="decision_step", value=0)
        a_steps = WholeNumber(label="num_inference_steps", value=controls["steps"])
        a_head = WholeNumber(label="head_steps", value=controls["head_steps"])
        a_cfg = as_sent(gr.Number(label="guidance_scale", value=controls["guidance_scale"]))
        # Dropdowns as sent: a value that is not a choice is refused by the handlers, by name.
        a_sched = as_sent(gr.Dropdown(list(GUIDANCE_SCHEDULES), value=defaults["guidance_schedule"],
                                      label="guidance_schedule"))
        a_temp = as_sent(gr.Number(label="temperature", value=controls["temperature"]))
        a_seed = WholeNumber(label="seed", value=-1)
        a_n = WholeNumber(label="num_images", value=defaults["num_images"])
        a_head_sampler = as_sent(gr.Dropdown(list(HEAD_SAMPLERS), value=controls["head_sampler"],
                                             label="head_sampler"))
        a_files = gr.File(label="images", file_count="multiple")
        a_records = gr.JSON(label="parameters")
        a_gen = gr.Button("api-generate")
        e_image = CheckedImage(label="image", type="filepath")
        e_mask = CheckedImage(label="mask", type="filepath")
        e_strength = as_sent(gr.Number(label="strength", value=0.5))
        e_prompt = as_sent(gr.Textbox(label="prompt", value=""))
        e_paste = as_sent(gr.Checkbox(label="paste_back", value=True))
        e_paste_var = as_sent(gr.Checkbox(label="paste_back", value=False))
        e_explain = as_sent(gr.Checkbox(label="explain", value=False))
        e_explanations = gr.JSON(label="explanations")
        a_inpaint = gr.Button("api-inpaint")
        a_variations = gr.Button("api-variations")
        s_image = CheckedImage(label="image", type="filepath")
        s_top = WholeNumber(label="top_k", value=5)
        s_mode = as_sent(gr.Dropdown(list(h.SEARCH_MODES), value=h.SEARCH_BANK, label="mode"))
        s_file = gr.File(label="captions_file", type="filepath")
        s_labels = as_sent(gr.Textbox(label="labels", value=""))
        s_out = gr.JSON(label="results")
        a_search = gr.Button("api-search")
    return SimpleNamespace(a_prompt=a_prompt, a_negative=a_negative, a_k=a_k, a_decision=a_decision,
                           a_steps=a_steps, a_head=a_head, a_cfg=a_cfg, a_sched=a_sched, a_temp=a_temp,
                           a_seed=a_seed, a_n=a_n, a_head_sampler=a_head_sampler, a_files=a_files,
                           a_records=a_records, a_gen=a_gen,
                           e_image=e_image, e_mask=e_mask, e_strength=e_strength, e_paste=e_paste,
                           e_prompt=e_prompt, e_paste_var=e_paste_var,
                           e_explain=e_explain, e_explanations=e_explanations, a_inpaint=a_inpaint,
                           a_variations=a_variations,
                           s_image=s_image, s_top=s_top, s_mode=s_mode, s_file=s_file, s_labels=s_labels,
                           s_out=s_out, a_search=a_search)


# ----- events -----
def _wire_generate(ctx: h.AppContext, ui: SimpleNamespace, controls: dict, defaults: dict) -> None:
    """Generate, Stop, the step/decision helpers and the seed controls."""
    # Generation handlers are async generators over a worker thread (app.jobs): a cancel or a
    # closed page stops the decoding within one step and frees the queue slot only after it.
    async def ui_generate(session, prompt, negative_prompt, num_candidates, decision_step, num_steps, head_steps,
                          head_sampler, guidance_scale, guidance_schedule, temperature, seed, random_seed, num_images,
                          preview_mode):
        job = h.next_job(session)
        try:
            settings = h.settings_from_inputs(prompt, negative_prompt, num_candidates, decision_step, num_steps,
                                              head_steps, guidance_scale, guidance_schedule, temperature,
                                              h.resolve_seed(seed, random_seed), num_images, head_sampler)
            views = h.generate_stream(ctx, session, settings, preview_mode, job=job)
            async for v in iterate_in_thread(views, job):
                yield (
                    _skip(v.status), None if v.reset else _skip(v.grid), None if v.reset else _skip(v.scores),
                    _skip(v.final),
                    gr.DownloadButton(value=v.download, visible=True) if v.download else gr.skip(),
                    gr.Gallery(value=v.gallery, visible=len(v.gallery) > 1) if v.gallery is not None
                    else gr.skip(),
                    _skip(v.infotext),
                )
        finally:
            h.end_job(session, job)

    gen_event = gr.on([ui.gen_btn.click], fn=h.begin_job, inputs=[ui.session], outputs=None, queue=False,
                      api_visibility="private").then(
        ui_generate, inputs=[ui.session, *ui.gen_controls, ui.preview_mode],
        outputs=[ui.status, ui.grid, ui.scores_plot, ui.final, ui.download, ui.run_gallery, ui.infotext],
        concurrency_id="model", api_visibility="private", show_progress="hidden")
    gen_event.then(lambda s: gr.Gallery(value=h.history_items(ctx, s)), inputs=[ui.session], outputs=[ui.history],
                   api_visibility="private", queue=False)
    ui.stop_btn.click(h.request_stop, inputs=[ui.session], outputs=None, queue=False, api_visibility="private")
    ui.examples.click(lambda sample: sample[0], [ui.examples], [ui.prompt], queue=False, api_visibility="private")

    def on_steps(num_steps, decision_step, num_candidates):
        num_steps = int(num_steps)
        top = max(1, num_steps - 1)
        return (gr.Slider(maximum=max(2, top), value=min(int(decision_step), top),
                          interactive=num_steps >= 2 and int(num_candidates) > 1),
                h.decision_info(num_steps, min(int(decision_step), top), ctx.manager.pipe.config.seq_len
                                if ctx.manager.pipe else controls["seq_len"], num_candidates))

    # One queued handler for all three controls (not three unqueued ones): queued events of a
    # session run in order, one at a time, so a stale "of 16" can never land after "of 6".
    gr.on([ui.steps.input, ui.k.input, ui.decision.input], on_steps, [ui.steps, ui.decision, ui.k],
          [ui.decision, ui.decision_md], concurrency_limit=1, trigger_mode="always_last", show_progress="hidden",
          api_visibility="private")
    ui.randomize.change(lambda random_seed: gr.Number(interactive=not random_seed), [ui.randomize], [ui.seed],
                        queue=False, api_visibility="private")
    ui.reuse_btn.click(lambda s: (h.reuse_last_seed(s), False), [ui.session], [ui.seed, ui.randomize], queue=False,
                       api_visibility="private")


def _wire_edit(ctx: h.AppContext, ui: SimpleNamespace, controls: dict, defaults: dict) -> None:
    """Edit (inpaint / variations) with live candidates, Stop, and sending images to the editor."""
    async def ui_edit(session, editor, mode, prompt, num_candidates, decision_step, strength, paste_back, explain,
                      seed, random_seed):
        job = h.next_job(session)
        try:
            edit = h.edit_input(editor, mode, strength, paste_back)
            # The Edit tab shows no sampler controls: steps, CFG, temperature and the head's are the model's.
            settings = h.settings_from_inputs(h.edit_prompt(ctx, prompt, edit), "", num_candidates,
                                              decision_step or None, None, None, None,
                                              defaults["guidance_schedule"], None,
                                              h.resolve_seed(seed, random_seed), 1)
            views = h.generate_stream(ctx, session, settings, job=job, edit=edit, explain=bool(explain))
            async for v in iterate_in_thread(views, job):
                yield (_skip(v.status), None if v.reset else _skip(v.grid), None if v.reset else _skip(v.scores),
                       _skip(v.final), gr.DownloadButton(value=v.download, visible=True) if v.download
                       else gr.skip(), _skip(v.infotext))
        finally:
            h.end_job(session, job)

    event = gr.on([ui.edit_btn.click], fn=h.begin_job, inputs=[ui.session], outputs=None, queue=False,
                  api_visibility="private").then(
        ui_edit, inputs=[ui.session, ui.editor, ui.edit_mode, ui.edit_prompt, ui.edit_k, ui.edit_decision,
                         ui.edit_strength, ui.edit_paste, ui.edit_explain, ui.edit_seed, ui.edit_randomize],
        outputs=[ui.edit_status, ui.edit_grid, ui.edit_scores, ui.edit_final, ui.edit_download, ui.edit_infotext],
        concurrency_id="model", api_visibility="private", show_progress="hidden")
    event.then(lambda s: gr.Gallery(value=h.history_items(ctx, s)), inputs=[ui.session], outputs=[ui.history],
               api_visibility="private", queue=False)
    ui.edit_stop_btn.click(h.request_stop, inputs=[ui.session], outputs=None, queue=False, api_visibility="private")
    ui.edit_randomize.change(lambda random_seed: gr.Number(interactive=not random_seed), [ui.edit_randomize],
                             [ui.edit_seed], queue=False, api_visibility="private")
    ui.edit_mode.change(lambda m: gr.Checkbox(value=m == h.EDIT_INPAINT), [ui.edit_mode], [ui.edit_paste],
                        queue=False, api_visibility="private")
    for btn, which in ((ui.to_edit_btn, "result"), (ui.history_to_edit_btn, "history")):
        btn.click(lambda s, w=which: (h.edit_source(ctx, s, w), gr.Tabs(selected="edit")), [ui.session],
                  [ui.editor, ui.tabs], queue=False, api_visibility="private")


def _wire_history(ctx: h.AppContext, ui: SimpleNamespace, controls: dict, defaults: dict) -> None:
    """History selection, PNG drop, and sending parameters to Generate."""
    def on_history_select(sess, evt: gr.SelectData):
        record = h.select_history(ctx, sess, evt.index)
        return record.to_dict(), record.to_dict()

    def send_to_generate(rec):
        if not rec:
            raise h.fail("pick an image in the history (or drop a PNG made by the app) first")
        if ctx.manager.pipe is None:
            raise h.fail("no model is loaded: pick one in the Model tab first")
        seq_len = ctx.manager.pipe.config.seq_len
        try:
            c = h.controls_from_record(h.ImageRecord.from_dict(rec), ctx.manager.pipe.config)
        except (TypeError, ValueError) as err:
            raise h.fail(f"these parameters cannot be used: {err}") from None
        return (c["prompt"], c["negative_prompt"], c["num_candidates"],
                gr.Slider(maximum=max(2, c["num_inference_steps"] - 1), value=c["decision_step"],
                          interactive=c["num_inference_steps"] >= 2 and c["num_candidates"] > 1),
                c["num_inference_steps"], c["head_steps"], c["head_sampler"], c["guidance_scale"],
                c["guidance_schedule"],
                c["temperature"], gr.Number(value=c["seed"], interactive=True), False, 1,
                h.decision_info(c["num_inference_steps"], c["decision_step"], seq_len, c["num_candidates"]),
                gr.Tabs(selected="generate"))

    send_outputs = ui.gen_controls + [ui.decision_md, ui.tabs]
    ui.history.select(on_history_select, [ui.session], [ui.picked, ui.picked_json], api_visibility="private",
                      queue=False)
    ui.refresh_btn.click(lambda s: h.history_items(ctx, s), [ui.session], [ui.history], api_visibility="private",
                         queue=False)
    ui.send_btn.click(send_to_generate, [ui.picked], send_outputs, api_visibility="private", queue=False)
    ui.send_png_btn.click(send_to_generate, [ui.picked], send_outputs, api_visibility="private", queue=False)

    def on_png(path):
        if path is None:
            return None, None
        record = h.read_parameters(path)
        return record.to_dict(), record.to_dict()

    ui.png_in.upload(on_png, [ui.png_in], [ui.picked, ui.picked_json], api_visibility="private", queue=False)
    ui.png_in.clear(lambda: (None, None), None, [ui.picked, ui.picked_json], api_visibility="private", queue=False)

    def history_to_search(sess):
        if not sess.selected:
            raise h.fail("pick an image in the history first")
        return sess.selected, gr.Tabs(selected="search")

    ui.to_search_btn.click(history_to_search, [ui.session], [ui.search_img, ui.tabs], api_visibility="private",
                           queue=False)


def _wire_search(ctx: h.AppContext, ui: SimpleNamespace, controls: dict, defaults: dict) -> None:
    """Reverse search and using its best caption as the prompt."""
    ui.mode.change(lambda m: (gr.File(visible=m == h.SEARCH_FILE), gr.Textbox(visible=m == h.SEARCH_LABELS)),
                   [ui.mode], [ui.caption_file, ui.labels], queue=False, api_visibility="private")

    def ui_search(image, top_k, mode, captions_file, labels):
        found = h.search(ctx, image, top_k, mode, captions_file, labels)
        kind = "softmax probability over the labels" if mode == h.SEARCH_LABELS else "cosine similarity"
        return h.search_table(found), f"Score: {kind} in the model's joint image-text space."

    ui.search_btn.click(ui_search, [ui.search_img, ui.top_k, ui.mode, ui.caption_file, ui.labels],
                        [ui.results, ui.results_note], concurrency_id="search", concurrency_limit=SEARCH_CONCURRENCY,
                        api_visibility="private")

    def use_caption(table):
        rows = table.values.tolist() if hasattr(table, "values") else (table or [])
        if not rows or not rows[0] or not rows[0][1]:
            raise h.fail("search first: there is no caption to use yet")
        return rows[0][1], gr.Tabs(selected="generate")

    ui.use_caption_btn.click(use_caption, [ui.results], [ui.prompt, ui.tabs], queue=False, api_visibility="private")


def _wire_model(ctx: h.AppContext, ui: SimpleNamespace, controls: dict, defaults: dict) -> None:
    """Loading another model (sliders follow its token count and sampler defaults) and rescanning folders."""
    def ui_switch(name):
        h.switch_model(ctx, name)
        loaded = h.default_controls(ctx)
        return (ctx.manager.info_markdown(), h.model_card(ctx), _banner(ctx),
                gr.Slider(maximum=loaded["seq_len"], value=loaded["steps"],
                          info=f"at most one step per token ({loaded['seq_len']} tokens)"),
                gr.Slider(maximum=max(2, loaded["steps"] - 1), value=loaded["decision"]), loaded["guidance_scale"],
                loaded["temperature"], gr.Slider(maximum=loaded["head_steps_max"], value=loaded["head_steps"]),
                loaded["head_sampler"], _examples(ctx))

    ui.load_btn.click(ui_switch, [ui.model_dd], [ui.model_info, ui.card, ui.banner, ui.steps, ui.decision,
                                                 ui.cfg, ui.temperature, ui.head_steps, ui.head_sampler,
                                                 ui.examples],
                      concurrency_id="model", api_visibility="private")
    ui.rescan_btn.click(lambda: gr.Dropdown(choices=list(ctx.manager.choices())), None, [ui.model_dd],
                        queue=False, api_visibility="private")


def _wire_api(ctx: h.AppContext, ui: SimpleNamespace, controls: dict, defaults: dict) -> None:
    """The two public endpoints, typed by the hidden components."""
    async def generate(sess: h.SessionState, prompt: str, negative_prompt: str = "",
                 num_candidates: int = APP_DEFAULT_CANDIDATES, decision_step: int = 0,
                 num_inference_steps: int = controls["steps"], head_steps: int = controls["head_steps"],
                 guidance_scale: float = controls["guidance_scale"], guidance_schedule: str = defaults["guidance_schedule"],
                 temperature: float = controls["temperature"], seed: int = -1, num_images: int = defaults["num_images"],
                 head_sampler: str = controls["head_sampler"]):
        """Generate images; returns the PNG files (parameters in their text chunks) and the parameters."""
        job = h.next_job(sess)
        try:
            settings = h.settings_from_inputs(prompt, negative_prompt, num_candidates,
                                              None if not decision_step else decision_step, num_inference_steps,
                                              head_steps, guidance_scale, guidance_schedule, temperature,
                                              h.resolve_seed(seed, False), num_images, head_sampler)
            async for out in iterate_in_thread(h.generate_api_stream(ctx, sess, settings, job=job), job):
                yield (gr.skip(), gr.skip()) if out is None else out
        finally:
            h.end_job(sess, job)

    ui.a_gen.click(generate, [ui.session, ui.a_prompt, ui.a_negative, ui.a_k, ui.a_decision, ui.a_steps, ui.a_head,
                              ui.a_cfg, ui.a_sched, ui.a_temp, ui.a_seed, ui.a_n, ui.a_head_sampler],
                   [ui.a_files, ui.a_records],
                   api_name="generate", concurrency_id="model")

    def search(image: str, top_k: int = 5, mode: str = "bank", captions_file: str | None = None,
               labels: str = ""):
        """Reverse search: the best captions for an image, [{rank, caption, score, details}]."""
        return h.search(ctx, image, top_k, mode, captions_file, labels)

    async def run_edit(sess: h.SessionState, edit_args: tuple, prompt, negative_prompt, num_candidates, decision_step,
                       head_steps, guidance_scale, guidance_schedule, temperature, seed, explain, head_sampler):
        job = h.next_job(sess)
        try:
            edit = h.edit_input_from_files(*edit_args)
            settings = h.settings_from_inputs(h.edit_prompt(ctx, prompt, edit), negative_prompt, num_candidates,
                                              None if not decision_step else decision_step, None, head_steps,
                                              guidance_scale, guidance_schedule, temperature,
                                              h.resolve_seed(seed, False), 1, head_sampler)
            stream = h.generate_api_stream(ctx, sess, settings, job=job, edit=edit, explain=explain)
            async for out in iterate_in_thread(stream, job):
                yield (gr.skip(), gr.skip(), gr.skip()) if out is None else out
        finally:
            h.end_job(sess, job)

    async def inpaint(sess: h.SessionState, image: str, mask: str, prompt: str, negative_prompt: str = "",
                      num_candidates: int = APP_DEFAULT_CANDIDATES, decision_step: int = 0,
                      head_steps: int = controls["head_steps"], guidance_scale: float = controls["guidance_scale"],
                      guidance_schedule: str = defaults["guidance_schedule"], temperature: float = controls["temperature"],
                      seed: int = -1, paste_back: bool = True, explain: bool = False,
                      head_sampler: str = controls["head_sampler"]):
        """Inpaint: regenerate the region a mask image marks (white = regenerate; the size of the image) for
        the prompt (the whole picture as it should be); returns the PNG, its parameters (with the source's
        SHA-256) and, with explain, why the candidate won (per-token leave-one-out contributions)."""
        async for out in run_edit(sess, (image, mask, None, paste_back, h.EDIT_INPAINT), prompt, negative_prompt, num_candidates,
                                  decision_step, head_steps, guidance_scale, guidance_schedule, temperature, seed,
                                  explain, head_sampler):
            yield out

    async def variations(sess: h.SessionState, image: str, prompt: str = "", strength: float = 0.5,
                         negative_prompt: str = "", num_candidates: int = APP_DEFAULT_CANDIDATES,
                         decision_step: int = 0, head_steps: int = controls["head_steps"],
                         guidance_scale: float = controls["guidance_scale"], guidance_schedule: str = defaults["guidance_schedule"],
                         temperature: float = controls["temperature"], seed: int = -1, paste_back: bool = False,
                         explain: bool = False, head_sampler: str = controls["head_sampler"]):
        """Variations: regenerate a `strength` share of the image's tokens (chosen by the seed) for the prompt
        (empty: the model's own best caption of the image); returns the PNG, its parameters and, with
        explain, why the candidate won."""
        async for out in run_edit(sess, (image, None, strength, paste_back, h.EDIT_VARIATIONS), prompt, negative_prompt,
                                  num_candidates, decision_step, head_steps, guidance_scale, guidance_schedule,
                                  temperature, seed, explain, head_sampler):
            yield out

    settings = [ui.a_negative, ui.a_k, ui.a_decision, ui.a_head, ui.a_cfg, ui.a_sched, ui.a_temp, ui.a_seed]
    outputs = [ui.a_files, ui.a_records, ui.e_explanations]
    ui.a_inpaint.click(inpaint, [ui.session, ui.e_image, ui.e_mask, ui.a_prompt, *settings, ui.e_paste, ui.e_explain,
                                 ui.a_head_sampler], outputs, api_name="inpaint", concurrency_id="model")
    ui.a_variations.click(variations, [ui.session, ui.e_image, ui.e_prompt, ui.e_strength, *settings,
                                       ui.e_paste_var, ui.e_explain, ui.a_head_sampler], outputs, api_name="variations",
                          concurrency_id="model")

    ui.a_search.click(search, [ui.s_image, ui.s_top, ui.s_mode, ui.s_file, ui.s_labels], [ui.s_out],
                      api_name="search", concurrency_id="search", concurrency_limit=SEARCH_CONCURRENCY)


def _wire_page_load(ctx: h.AppContext, ui: SimpleNamespace, controls: dict, defaults: dict) -> None:
    """Page load: the current model may differ from the one at build time."""
    def on_load(sess):
        loaded = h.default_controls(ctx)
        names = list(ctx.manager.choices())
        same = loaded["seq_len"] == controls["seq_len"]  # the controls built with the page still fit the model
        return (_banner(ctx), gr.skip() if same else gr.Slider(maximum=loaded["seq_len"], value=loaded["steps"]),
                gr.skip() if same else gr.Slider(maximum=max(2, loaded["steps"] - 1), value=loaded["decision"]),
                gr.skip() if same else h.decision_info(loaded["steps"], loaded["decision"], loaded["seq_len"],
                                                       APP_DEFAULT_CANDIDATES),
                gr.Dropdown(choices=names, value=ctx.manager.name if ctx.manager.name in names else None),
                ctx.manager.info_markdown(), h.model_card(ctx), _examples(ctx), h.history_items(ctx, sess))

    ui.demo.load(on_load, [ui.session], [ui.banner, ui.steps, ui.decision, ui.decision_md, ui.model_dd, ui.model_info,
                                         ui.card, ui.examples, ui.history],
                 api_visibility="private", queue=False, show_progress="hidden")


def _patient_self_check() -> None:
    """Gradio pings its own URL after starting and refuses to run if that takes more than ~15 s;
    on a busy CPU (a training run beside the app) the server is up but slow, so ask a few times."""
    from gradio import networking

    check = networking.url_ok
    if getattr(check, "dream_patient", False):
        return

    def url_ok(url: str) -> bool:
        return any(check(url) for _ in range(4))

    url_ok.dream_patient = True  # type: ignore[attr-defined]
    networking.url_ok = url_ok


def launch_app(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
               inbrowser: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Launch with the app's CSS, keyboard shortcut, upload limit and the folders it may serve."""
    ctx: h.AppContext = demo.dream_context  # type: ignore[attr-defined]
    ctx.display_dir.mkdir(parents=True, exist_ok=True)
    ctx.history.root.mkdir(parents=True, exist_ok=True)
    ctx.history.remove_leftovers()  # *.png.tmp of saves a kill interrupted
    remove_leftovers(ctx.display_dir)
    _patient_self_check()
    return demo.launch(
        server_name=host, server_port=port, share=share, inbrowser=inbrowser,
        prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True, ssr_mode=False,
        allowed_paths=[str(ctx.history.root), str(ctx.display_dir)], max_file_size=MAX_UPLOAD_BYTES,
        css=CSS, head=HEAD, theme=gr.themes.Soft(), footer_links=["api", "settings"], run_history=False,
    )
