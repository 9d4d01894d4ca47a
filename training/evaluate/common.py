"""Compatibility re-exports: what this module held is now split by idea into `sets`, `cli`,
`plotting`, `scoring` and `distributed`, and batched generation is `DreamPipeline.generate_batch`.
Kept only for importers not yet moved (linear_probe.py, owned by another branch); new code
imports the modules themselves. Remove once nothing imports it."""

from .cli import (add_model_args, add_sampler_args, load_pipeline, parse_int_list, run_cli,  # noqa: F401
                  run_metadata, sampler_from_args, write_json)
from .distributed import DistInfo, barrier, chunked, dist_info, init_distributed, shard_indices  # noqa: F401
from .plotting import image_grid, plot_bars, plot_lines  # noqa: F401
from .scoring import clip_scores, decision_step_for_fraction, image_tokens, load_open_clip, vae_round_trip  # noqa: F401
from .sets import (EVAL_SEED, IMAGE_SUFFIXES, STREAM_MASKS, STREAM_ONE_OBJECT, STREAM_PROBE_TRAIN,  # noqa: F401
                   STREAM_PROBE_VAL, STREAM_SEARCH, STREAM_TWO_OBJECT, STREAM_ZERO_SHOT, image_folder, list_images,
                   load_images, one_object_prompts, prompt_seeds, read_prompts, rendered_scenes, scene_from_caption,
                   two_object_prompts)
