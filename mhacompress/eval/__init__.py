"""GLUE evaluation: task specs (tasks), data loading (data), official metrics (metrics), batched inference
(runner), side-by-side scoring for `reduce --eval` (compare) and fine-tuning (finetune)."""
