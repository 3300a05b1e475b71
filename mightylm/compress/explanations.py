"""Sequence-level distillation with explanation data (Orca 2, Mitra et al. 2023): a teacher answers prompts under a
system instruction that asks for a reasoning strategy, and the student is fine-tuned on the answers with that
instruction erased ("prompt erasure"), so it learns to choose the strategy itself. Works across tokenizers: the
student only ever sees text. The work behind `mighty distill-data`.
"""

from __future__ import annotations

import json
from pathlib import Path

# Orca 2 section 3's strategies, as system instructions to the teacher.
STYLES = {
    "step_by_step": "Think step by step. Explain your reasoning briefly, then give the final answer on its own line.",
    "recall_then_answer": "First recall the facts you need to answer, then use them to give the answer.",
    "direct": "Answer directly and concisely.",
}


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from JSONL ({"prompt"}, {"instruction", "input"?} or {"messages"}: the first user message) or a
    text file with one prompt per line."""
    from mightylm.data import DataError, iter_jsonl

    path = Path(path)
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for number, record in iter_jsonl(path):
            if isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            elif isinstance(record.get("instruction"), str):
                prompts.append(record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else ""))
            elif isinstance(record.get("messages"), list):
                users = [m.get("content") for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                if not users or not isinstance(users[0], str):
                    raise DataError(f"{path}:{number}: no user message to answer")
                prompts.append(users[0])
            else:
                raise DataError(f"{path}:{number}: expected a 'prompt', an 'instruction' or 'messages'")
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def explanation_data(teacher, tokenizer, prompts: list[str], *, style: str = "step_by_step", max_new_tokens: int = 256,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 8, progress: bool = True):
    """Yield chat records {"messages": [user, assistant], "style": ...}: the teacher's answer to each prompt under
    the style's system instruction (styles cycle through STYLES with style="mixed"), the instruction erased."""
    from tqdm import tqdm

    from mightylm.generate import Sampling, generate

    styles = list(STYLES) if style == "mixed" else [style]
    s = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=None, seed=seed,
                 stop_token_ids=tokenizer.stop_token_ids)
    bar = tqdm(total=len(prompts), desc="teacher answers", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        chosen = [styles[(start + i) % len(styles)] for i in range(len(chunk))]
        ids = [tokenizer.encode_chat([{"role": "system", "content": STYLES[c]}, {"role": "user", "content": p}])
               for c, p in zip(chosen, chunk)]
        for prompt, c, answer in zip(chunk, chosen, generate(teacher, ids, s)):
            text = tokenizer.decode([t for t in answer if t not in s.stop_token_ids]).strip()
            yield {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}], "style": c}
        bar.update(len(chunk))
    bar.close()


def write_jsonl(records, path: Path) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
