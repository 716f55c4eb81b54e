"""The tiny offline model for tests: it lives in `perennial_trainer.tinymodel` (the laptop demo uses it too)."""

from perennial_trainer.tinymodel import (  # noqa: F401
    CHAT_TEMPLATE,
    COLOURS,
    FRUITS,
    QUESTION_TEMPLATES,
    SPECIAL,
    build_tiny_model,
    fruit_rows,
    tiny_model_path,
    write_jsonl,
)
