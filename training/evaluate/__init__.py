"""Evaluation commands, each `python -m training.evaluate.<name> --model DIR --out DIR [...]`
writing a JSON of results and a PNG plot:

- `linear_probe`: BatchNorm + linear probe on frozen encoder features (image folder or Shapes World);
- `zero_shot_masking`: zero-shot accuracy against the mask ratio (the paper's Fig. 7);
- `fid_clip`: FID and CLIP score from local Inception / open_clip weights, generation data-parallel;
- `sad_sweep`: Semantically Aligned Decoding over K and the decision step (Tables 6 and 17);
- `faithfulness`: Shapes World prompt faithfulness with the exact judge.

What they share, one idea per module: `sets` (the seeded prompt sets, renders, image folders),
`scoring` (VAE tokens, CLIPScore), `critic` (the critic's gap: SAD's choice vs best-of-K by the
judge), `stats` (95 % Wilson intervals), `plotting`, `distributed` (the data-parallel split) and
`cli` (flags, model loading, JSON output). The paper's tables at toy scale are `bench/paper_*.py`. Batched generation is `DreamPipeline.generate_batch`.
"""
