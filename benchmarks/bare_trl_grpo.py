"""The bare-TRL baseline of benchmarks/trainer_overhead.py: the same GRPO task, no Perennial.

    python benchmarks/bare_trl_grpo.py BASE_MODEL PARENT_ADAPTER DATA_JSONL OUT_DIR MAX_STEPS
"""

import json
import re
import sys
import time

t0 = time.monotonic()
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

base, parent, data, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
set_seed(42)


def text(c):
    return c if isinstance(c, str) else "".join(m["content"] for m in c)


def format(completions, **kw):  # noqa: A001 - named like the grader
    return [1.0 if re.fullmatch(r"<answer>[a-z]+</answer>", text(c)) else 0.0 for c in completions]


def correct(completions, answer, **kw):
    return [1.0 if text(c).strip() == f"<answer>{a}</answer>" else 0.0 for c, a in zip(completions, answer)]


tok = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), parent, is_trainable=True)
rows = [json.loads(l) for l in open(data)]
args = GRPOConfig(
    output_dir=out, learning_rate=3e-4, max_steps=steps, per_device_train_batch_size=32, num_generations=16,
    max_completion_length=12, temperature=1.0, beta=0.0, entropy_coef=0.05, reward_weights=[1.0, 1.0],
    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=42, data_seed=42,
    lr_scheduler_type="constant_with_warmup", disable_tqdm=True,
    activation_checkpointing=False,  # TRL's default is on; on CPU it only recomputes (FACTS.md)
)
trainer = GRPOTrainer(model=model, reward_funcs=[format, correct], args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
trainer.train()
trainer.model.save_pretrained(out)
print(json.dumps({"wall_seconds": time.monotonic() - t0}))
