"""Fine-tuning tasks: what each downstream task supplies to hvpmtl/train/finetune.py (base.py says what)."""
