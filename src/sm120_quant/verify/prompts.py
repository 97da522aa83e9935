"""Held-out text for `quantize verify`: written for this purpose, so it is in no calibration set (those are drawn from
installed Python sources, agentic transcripts and chats) and in no training set of the tiny models.

A mix of the kinds of text a served GLM sees: prose, Chinese, code in several languages, data and arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

from sm120_quant.errors import UserError

BUILTIN_PROMPTS: tuple[str, ...] = (
    (
        "The keeper of the north light kept two logbooks. In the first she wrote the weather every four hours: "
        "wind, swell, the colour of the sky at dusk. In the second she wrote down every ship that passed close "
        "enough to read its name. After eleven winters the second book was thinner than the first, and she "
        "began to wonder whether the ships had changed their routes or whether she had simply stopped looking "
        "for them."
    ),
    (
        "A hash table that grows by doubling keeps its average insertion cost constant. When the load factor "
        "passes a threshold, every entry is moved into a table twice as large, which costs time proportional "
        "to the number of entries. Because the table doubles each time, the total work of all moves is at most "
        "twice the number of insertions, so each insertion pays for itself and for one future move."
    ),
    (
        "#include <stddef.h>\n\nstruct ring {\n    unsigned char *buf;\n    size_t cap, head, tail;\n};\n\n/* "
        "Returns the number of bytes copied out of the ring into dst. */\nsize_t ring_read(struct ring *r, "
        "unsigned char *dst, size_t n) {\n    size_t done = 0;\n    while (done < n && r->tail != r->head) {\n "
        "       dst[done++] = r->buf[r->tail];\n        r->tail = (r->tail + 1) % r->cap;\n    }\n    return "
        "done;\n}\n"
    ),
    (
        "use std::collections::BTreeMap;\n\n/// Parses lines of `key = value`, skipping blanks and `#` "
        "comments.\npub fn parse_settings(text: &str) -> Result<BTreeMap<String, String>, String> {\n    let "
        "mut out = BTreeMap::new();\n    for (n, line) in text.lines().enumerate() {\n        let line = "
        "line.trim();\n        if line.is_empty() || line.starts_with('#') {\n            continue;\n        "
        "}\n        let (key, value) = line\n            .split_once('=')\n            .ok_or_else(|| "
        "format!(\"line {}: expected key = value\", n + 1))?;\n        out.insert(key.trim().to_string(), "
        "value.trim().to_string());\n    }\n    Ok(out)\n}\n"
    ),
    (
        "function debounce(fn, waitMs) {\n  let timer = null;\n  return function (...args) {\n    "
        "clearTimeout(timer);\n    timer = setTimeout(() => fn.apply(this, args), waitMs);\n  };\n}\n\nconst "
        "saveDraft = debounce((text) => localStorage.setItem('draft', text), 500);\n"
        "document.querySelector('#editor').addEventListener('input', (e) => saveDraft(e.target.value));\n"
    ),
    (
        "SELECT c.region, date_trunc('month', o.placed_at) AS month, sum(o.total) AS revenue\nFROM orders o\n"
        "JOIN customers c ON c.id = o.customer_id\nWHERE o.status = 'paid' AND o.placed_at >= now() - interval "
        "'1 year'\nGROUP BY c.region, month\nORDER BY c.region, month;\n-- One row per region and month; "
        "unpaid orders are left out so refunds do not count twice."
    ),
    "春天的早晨，河边的柳树刚刚发芽。老师带着学生们沿着小路慢慢走，一边走一边讲每一种鸟的名字。有个孩子问，为什么燕子每年都能找到去年的屋檐？老师笑着说，这个问题科学家们也研究了很多年。",
    (
        "A train leaves at 09:40 and travels 210 km at an average speed of 84 km/h. The journey takes 210 / 84 "
        "= 2.5 hours, so it arrives at 12:10. If a 15-minute stop is added halfway, the arrival moves to "
        "12:25, and the average speed over the whole trip drops to 210 / 2.75, which is about 76.4 km/h."
    ),
    (
        "{\"id\": 4182, \"name\": \"Basalt trail\", \"length_km\": 12.6, \"elevation_gain_m\": 640, \"loop\": "
        "true, \"tags\": [\"forest\", \"ridge\", \"waterfall\"], \"open_months\": [5, 6, 7, 8, 9, 10], "
        "\"warnings\": [{\"kind\": \"rockfall\", \"segment\": \"km 7-8\"}]}"
    ),
    (
        "#!/bin/sh\nset -eu\n# Keep the newest seven nightly backups and delete the rest.\nkeep=7\nls -1t "
        "/var/backups/nightly-*.tar.zst | tail -n +$((keep + 1)) | while read -r old; do\n    echo \"removing "
        "$old\"\n    rm -- \"$old\"\ndone\n"
    ),
)

# Short openings for the greedy generations shown side by side in the report.
GENERATION_PROMPTS: tuple[str, ...] = (
    "def is_prime(n):\n",
    "The three largest rivers in Europe are",
    "for (int i = 0; i < n; i++) {\n",
)


def load_prompts(path: Path) -> list[str]:
    """Held-out prompts from a file: `.jsonl` holds one `{"text": ...}` object per line; any other file holds one
    prompt per non-empty line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: prompts file not found; pass an existing file or leave verify.prompts unset"
                        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: prompts file is not UTF-8 text") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e.msg}); each line must be {{\"text\": ...}}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{n}: expected an object with a string \"text\" field")
            prompts.append(record["text"])
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"{path}: no prompts; write one prompt per line")
    return prompts
