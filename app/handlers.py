"""The app's behaviour as plain functions over DreamPipeline (no Blocks here), so every button can
be tested without a browser; user mistakes become gr.Error messages, never tracebacks. One module
per concern, gathered here for the UI layer (app.ui) and the tests:

- app.session: the per-browser session, the shared context, jobs and Stop, seeds, errors;
- app.generation: Generate and the `generate` API (live candidate views, saving each image);
- app.editing: Edit and the `inpaint` / `variations` API (a source image and a mask or strength);
- app.search: reverse search (caption bank, caption file, zero-shot labels);
- app.history_tab: past images, the parameters a PNG carries, sending them back to Generate;
- app.model_tab: switching models, the controls' ranges and defaults for a model.
"""

from __future__ import annotations

from .editing import (EDIT_INPAINT, EDIT_MODES, EDIT_MODE_LABELS, EDIT_VARIATIONS, EditInput, edit_input,
                      edit_input_from_files, edit_prompt, edit_source, editor_mask)
from .generation import (PREVIEW_MARKED, PREVIEW_MODES, PREVIEW_PARTIAL, GenerateView, PreviewBudget,
                         candidate_states, decision_info, explanation_dict, generate_api_stream, generate_images,
                         generate_stream, progress_html, settings_from_inputs)
from .history_tab import controls_from_record, history_items, read_parameters, reuse_last_seed, select_history
from .images import MAX_UPLOAD_BYTES, image_sha256
from .jobs import Job
from .model_tab import default_controls, model_card, switch_model
from .params import GenerationSettings, ImageRecord
from .search import (MAX_LABELS, SEARCH_BANK, SEARCH_COLUMNS, SEARCH_FILE, SEARCH_LABELS, SEARCH_MODES,
                     SEARCH_MODE_LABELS, parse_labels, read_caption_file, search, search_table)
from .session import (DEFAULT_MIN_INTERVAL, DEFAULT_PREVIEW_BUDGET, AppContext, SessionState, begin_job, draw_seed,
                      end_job, fail, next_job, request_stop, resolve_seed)

__all__ = ["AppContext", "DEFAULT_MIN_INTERVAL", "DEFAULT_PREVIEW_BUDGET", "EDIT_INPAINT", "EDIT_MODES",
           "EDIT_MODE_LABELS", "EDIT_VARIATIONS", "EditInput", "GenerateView", "GenerationSettings", "ImageRecord",
           "Job", "MAX_LABELS", "MAX_UPLOAD_BYTES", "PREVIEW_MARKED", "PREVIEW_MODES", "PREVIEW_PARTIAL",
           "PreviewBudget", "SEARCH_BANK", "SEARCH_COLUMNS", "SEARCH_FILE", "SEARCH_LABELS", "SEARCH_MODES",
           "SEARCH_MODE_LABELS", "SessionState", "begin_job", "candidate_states", "controls_from_record",
           "decision_info", "default_controls", "draw_seed", "edit_input", "edit_input_from_files", "edit_prompt",
           "edit_source", "editor_mask", "end_job", "explanation_dict", "fail", "generate_api_stream",
           "generate_images", "generate_stream", "history_items", "image_sha256", "model_card", "next_job",
           "parse_labels", "progress_html", "read_caption_file", "read_parameters", "request_stop", "resolve_seed",
           "reuse_last_seed", "search", "search_table", "select_history", "settings_from_inputs", "switch_model"]
