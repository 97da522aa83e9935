"""Offline calibration generators: code, agentic tool use, structured data, chat, bilingual system prompts and
long context.

Nothing is downloaded. The code-derived content (source windows, docstrings, function bodies quoted in tool results)
comes from the `.py` files of this interpreter's standard library and of the packages a pass names, so a sample is a
function of (seed, pass name, sample index, Python version, those packages' installed versions). The CalibrationSet
hash pins all of that; a different Python gives a different hash.

Sample i of a pass is drawn from its own `random.Random(f"{pass_seed}/{i}")`, so samples do not depend on how many
were drawn before them.
"""

from __future__ import annotations

import ast
import csv
import functools
import importlib.util
import io
import json
import random
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sm120_quant.calib_data.sources import ChatSample, Measure, Sample, TextSample
from sm120_quant.errors import UserError
from sm120_quant.recipes.calibration import BuiltinName, BuiltinPass

# Folders of the stdlib that are tests, demos, vendored wheels, installed packages or generated codec tables.
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
     "__pycache__", "__phello__", "encodings"}
)
CODE_WINDOW_LINES = 300
MAX_CODE_FILE_BYTES = 400_000


# --------------------------------------------------------------------------------------------------------------------
# The code pool
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeFile:
    name: str  # display path, e.g. json/decoder.py or transformers/utils/hub.py
    path: Path


@dataclass(frozen=True)
class Function:
    name: str
    qualname: str
    lineno: int
    end_lineno: int
    source: str
    doc: str


def _package_root(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as e:
        raise UserError(f"builtin packages: cannot locate {name!r} ({e}); install it or remove it from packages") from e
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"builtin packages: {name!r} is not an installed package; install it or remove it")
    return Path(next(iter(spec.submodule_search_locations)))


def _walk(root: Path, prefix: str) -> list[CodeFile]:
    found = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if any(part in SKIPPED_DIRS for part in rel.parts[:-1]) or f.stat().st_size > MAX_CODE_FILE_BYTES:
            continue
        found.append(CodeFile(f"{prefix}{rel.as_posix()}", f))
    return found


@functools.cache
def code_files(packages: tuple[str, ...] = ()) -> tuple[CodeFile, ...]:
    """The stdlib's library .py files plus those of `packages`, sorted by display path."""
    files = _walk(Path(sysconfig.get_path("stdlib")), "")
    for name in packages:
        files.extend(_walk(_package_root(name), f"{name}/"))
    return tuple(sorted(files, key=lambda f: f.name))


@functools.cache
def read_code(f: CodeFile) -> str | None:
    """A file's text, or None when it is not UTF-8 (a few stdlib files declare other encodings on purpose)."""
    try:
        return f.path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


@functools.cache
def functions(f: CodeFile) -> tuple[Function, ...]:
    """Documented functions and methods of a file, in source order."""
    text = read_code(f)
    if text is None:
        return ()
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return ()
    lines = text.splitlines()
    found = []
    for parent in ast.walk(tree):
        for node in ast.iter_child_nodes(parent):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node):
                owner = f"{parent.name}." if isinstance(parent, ast.ClassDef) else ""
                end = node.end_lineno or node.lineno
                source = "\n".join(lines[node.lineno - 1:end])
                found.append(Function(node.name, owner + node.name, node.lineno, end, source,
                                      ast.get_docstring(node) or ""))
    return tuple(sorted(found, key=lambda fn: fn.lineno))


@functools.cache
def module_doc(f: CodeFile) -> str:
    text = read_code(f)
    try:
        return (ast.get_docstring(ast.parse(text)) or "") if text is not None else ""
    except SyntaxError:
        return ""


def module_name(f: CodeFile) -> str:
    return f.name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _pick_documented(rng: random.Random, files: tuple[CodeFile, ...], need_module_doc: bool = False) -> CodeFile:
    """A random file with documented functions; files are parsed only when drawn, not all up front."""
    while True:
        f = rng.choice(files)
        if functions(f) and (module_doc(f) or not need_module_doc):
            return f


def first_paragraph(doc: str) -> str:
    return doc.strip().split("\n\n")[0].replace("\n", " ").strip()


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------

SYSTEM_EN = (
    "You are a helpful assistant. Answer accurately and concisely.",
    "You are an expert software engineer. Explain your reasoning and prefer small, safe changes.",
    "You are a coding agent working in a git repository. Use the tools to inspect files before editing them.",
    "You are a senior Python reviewer. Point out bugs, edge cases and missing tests.",
    "You are a data engineer. When given tabular data, keep column names and types exact.",
    "You are a patient tutor. Explain concepts step by step with short examples.",
    "You are a technical writer. Write clear documentation in plain English.",
    "You are an SRE on call. Be precise about commands and their side effects.",
    "You are a research assistant. Cite the source you are quoting and say when you are unsure.",
    "You are a terse assistant. Answer in as few words as correctness allows.",
    "You are a translator between Chinese and English. Keep technical terms unchanged.",
    "You are a security reviewer. Flag unsafe input handling and explain the fix.",
)

SYSTEM_ZH = (
    "你是一个乐于助人的助手。请准确、简洁地回答问题。",
    "你是一名资深软件工程师。请说明你的思路，并优先做小而安全的修改。",
    "你是一个在 git 仓库中工作的编程智能体。修改文件之前，先用工具查看文件内容。",
    "你是一名 Python 代码审查专家。请指出缺陷、边界情况以及缺失的测试。",
    "你是一名数据工程师。处理表格数据时，请保持列名和类型完全一致。",
    "你是一位耐心的老师。请一步一步地解释概念，并给出简短的例子。",
    "你是一名技术文档作者。请用通俗易懂的语言编写文档。",
    "你是值班的运维工程师。请准确说明每条命令及其副作用。",
    "你是一名研究助理。引用资料时请注明出处，不确定时请直接说明。",
    "你是一个回答简练的助手。在保证正确的前提下尽量少用字。",
    "你是中英文技术翻译。请保持专业术语不变。",
    "你是一名安全审查员。请指出不安全的输入处理方式并说明修复方法。",
)

# (question, answer) pairs written for the bilingual pass; answers are short and factually correct.
QA_EN = (
    ("What is the difference between a list and a tuple in Python?",
     ("A list is mutable: you can append, remove and reassign items. A tuple is immutable, so it can be hashed and "
      "used as a dictionary key when all its items are hashable.")),
    ("How do I read a file line by line without loading it all into memory?",
     "Open it in a with-block and iterate over the file object: `for line in f:` reads one line at a time."),
    ("Why does 0.1 + 0.2 != 0.3 in floating point?",
     ("Neither 0.1 nor 0.2 has an exact binary representation, so their sum rounds to a double slightly above 0.3. "
      "Compare with a tolerance, for example math.isclose.")),
    ("What does HTTP status 429 mean?",
     "Too Many Requests: the client exceeded a rate limit. Retry after the delay given in the Retry-After header."),
    ("Explain what a mixture-of-experts layer is.",
     ("A router scores every token against a set of expert MLPs and sends it to the top-k of them; the layer output "
      "is the weighted sum of those experts' outputs, so only a fraction of the parameters run per token.")),
    ("How can I undo the last git commit but keep the changes?",
     "Run `git reset --soft HEAD~1`. The commit is removed and its changes stay staged."),
    ("What is the time complexity of binary search?",
     "O(log n) comparisons on a sorted array of n elements, because each step halves the remaining range."),
    ("When should I use a set instead of a list?",
     "When you need fast membership tests or uniqueness: `x in s` is O(1) on average for a set and O(n) for a list."),
    ("What does the `yield` keyword do?",
     ("It turns a function into a generator: each `yield` hands a value to the caller and suspends the function "
      "until the next value is requested.")),
    ("How do I convert a UTC timestamp to local time in Python?",
     ("Use `datetime.fromtimestamp(ts, tz=timezone.utc).astimezone()`; astimezone() without an argument converts to "
      "the system's local zone.")),
    ("What is quantization in machine learning?",
     ("Storing weights or activations with fewer bits, for example 4-bit floats with a shared scale per block, to cut "
      "memory and speed up inference at a small accuracy cost.")),
    ("Summarize the CAP theorem in one sentence.",
     "A distributed store that suffers a network partition must choose between consistency and availability."),
)

QA_ZH = (
    ("Python 中列表和元组有什么区别？",
     "列表是可变的，可以追加、删除和修改元素；元组是不可变的，当其元素都可哈希时，可以作为字典的键。"),
    ("如何逐行读取一个大文件而不把它全部加载到内存？",
     "在 with 语句中打开文件，然后直接遍历文件对象：`for line in f:` 每次只读取一行。"),
    ("为什么浮点数 0.1 + 0.2 不等于 0.3？",
     "0.1 和 0.2 都无法用二进制精确表示，相加后会舍入到一个略大于 0.3 的数。比较时应使用容差，例如 math.isclose。"),
    ("HTTP 状态码 429 是什么意思？", "请求过多：客户端超过了速率限制，应按照 Retry-After 头给出的时间后重试。"),
    ("请解释什么是混合专家（MoE）层。",
     ("路由器为每个 token 计算与各个专家 MLP 的匹配分数，并把它发送给得分最高的 k 个专家；输出是这些专家输出的加权和，"
      "因此每个 token 只用到一部分参数。")),
    ("怎样撤销最近一次 git 提交但保留修改？", "执行 `git reset --soft HEAD~1`，提交会被撤销，修改仍处于暂存状态。"),
    ("二分查找的时间复杂度是多少？", "在长度为 n 的有序数组上是 O(log n)，因为每一步都会把搜索范围减半。"),
    ("什么时候应该用集合而不是列表？", "需要快速判断成员或去重时：集合的 `x in s` 平均为 O(1)，列表为 O(n)。"),
    ("`yield` 关键字有什么作用？", "它把函数变成生成器：每次 `yield` 把一个值交给调用者，并暂停函数，直到下一次取值。"),
    ("机器学习中的量化是什么？",
     ("用更少的比特存储权重或激活值，例如每个块共享一个缩放因子的 4 位浮点数，"
      "以较小的精度损失换取更低的显存占用和更快的推理。")),
    ("用一句话概括 CAP 定理。", "发生网络分区时，分布式存储只能在一致性和可用性之间二选一。"),
    ("如何在 Linux 上查看某个端口被哪个进程占用？", "运行 `ss -ltnp | grep :端口号` 或 `lsof -i :端口号`。"),
)


# --------------------------------------------------------------------------------------------------------------------
# code
# --------------------------------------------------------------------------------------------------------------------


def _code(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    files = tuple(f for f in code_files(tuple(p.packages)) if read_code(f))
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    for i in order:
        f = files[i]
        lines = read_code(f).splitlines()
        # A window that starts at a top-level definition reads like a real excerpt, not a cut mid-statement.
        starts = [0] + [n for n, line in enumerate(lines) if line.startswith(("def ", "class ", "async def "))]
        start = random.Random(f"{seed}/{i}").choice(starts)
        body = "\n".join(lines[start:start + CODE_WINDOW_LINES])
        yield TextSample(f"builtin code {f.name}:{start + 1}", f"# {f.name}\n{body}\n")


# --------------------------------------------------------------------------------------------------------------------
# agentic
# --------------------------------------------------------------------------------------------------------------------


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_STR = {"type": "string"}
TOOLS = {
    "search_code": _tool("search_code", "Search the repository for a regular expression.",
                         {"pattern": _STR, "path": {"type": "string", "description": "folder to search"}},
                         ["pattern"]),
    "read_file": _tool("read_file", "Read a file, optionally a line range.",
                       {"path": _STR, "start_line": {"type": "integer"}, "end_line": {"type": "integer"}}, ["path"]),
    "apply_patch": _tool("apply_patch", "Apply a unified diff to the working tree.", {"patch": _STR}, ["patch"]),
    "run_tests": _tool("run_tests", "Run pytest on a path and return its summary.", {"target": _STR}, ["target"]),
    "run_shell": _tool("run_shell", "Run a shell command in the repository root.",
                       {"command": _STR, "timeout_s": {"type": "integer"}}, ["command"]),
    "list_directory": _tool("list_directory", "List the entries of a folder.", {"path": _STR}, ["path"]),
    "web_search": _tool("web_search", "Search the web and return the top results.", {"query": _STR}, ["query"]),
}

TASKS_EN = (
    "The tests around `{func}` in `{path}` started failing after a refactor. Find out why and fix it.",
    "Add a guard for empty input to `{func}` in `{path}` and make sure the tests still pass.",
    "Explain what `{func}` in `{path}` does, then add a short comment where it is least obvious.",
    "A user reports that `{func}` ({path}) behaves oddly on edge cases. Investigate and patch it.",
    "Review `{func}` in `{path}` for correctness and leave the code better documented.",
)
TASKS_ZH = (
    "重构之后，`{path}` 中 `{func}` 相关的测试开始失败。请找出原因并修复。",
    "请给 `{path}` 中的 `{func}` 增加对空输入的检查，并确保测试仍然通过。",
    "请解释 `{path}` 中 `{func}` 的作用，并在最不直观的地方加一条简短注释。",
    "有用户反馈 `{func}`（{path}）在边界情况下行为异常。请排查并修复。",
)
PATCH_COMMENTS = (
    "Callers may pass an empty sequence here; keep the early return.",
    "The order of these checks matters: the cheap test runs first.",
    "Mirror of the public docstring: see the function's contract above.",
    "Do not cache this result; the input can change between calls.",
)


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _numbered(source: str, first: int) -> str:
    return "\n".join(f"{first + k:>5}  {line}" for k, line in enumerate(source.splitlines()))


def _agentic(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    files = code_files()
    for i in range(10**9):
        rng = random.Random(f"{seed}/{i}")
        f = _pick_documented(rng, files)
        fn = rng.choice(functions(f))
        zh = rng.random() < 0.5
        folder = f.name.rsplit("/", 1)[0] if "/" in f.name else "."
        test_target = f"tests/test_{module_name(f).replace('.', '_')}.py"
        tool_names = ["search_code", "read_file", "apply_patch", "run_tests"]
        tool_names += rng.sample(["run_shell", "list_directory", "web_search"], k=rng.randint(0, 3))
        tools = tuple(TOOLS[n] for n in rng.sample(tool_names, k=len(tool_names)))
        task = rng.choice(TASKS_ZH if zh and rng.random() < 0.6 else TASKS_EN).format(func=fn.name, path=f.name)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": rng.choice(SYSTEM_ZH[1:4] if zh else SYSTEM_EN[1:4])},
            {"role": "user", "content": task},
        ]
        def_line = fn.source.splitlines()[0]
        messages += [
            {"role": "assistant", "content": "",
             "reasoning_content": f"I have not seen `{fn.name}` yet. Search for its definition first.",
             "tool_calls": [_call("search_code", pattern=f"def {fn.name}\\b", path=folder)]},
            {"role": "tool", "content": f"{f.name}:{fn.lineno}:{def_line}"},
            {"role": "assistant", "content": "",
             "reasoning_content": f"Found it at line {fn.lineno}. Read the whole function before changing anything.",
             "tool_calls": [_call("read_file", path=f.name, start_line=fn.lineno, end_line=fn.end_lineno)]},
            {"role": "tool", "content": _numbered(fn.source, fn.lineno)},
        ]
        body = fn.source.splitlines()
        if len(body) >= 3 and rng.random() < 0.7:
            comment = rng.choice(PATCH_COMMENTS)
            indent = body[1][: len(body[1]) - len(body[1].lstrip())] or "    "
            patch = (f"--- a/{f.name}\n+++ b/{f.name}\n@@ -{fn.lineno},3 +{fn.lineno},4 @@\n {body[0]}\n"
                     f"+{indent}# {comment}\n {body[1]}\n {body[2]}\n")
            messages += [
                {"role": "assistant", "content": "I will document the non-obvious part before touching logic.",
                 "reasoning_content": f"It should: {first_paragraph(fn.doc)[:300].rstrip('.')}. "
                                      "The safest change is a clarifying comment.",
                 "tool_calls": [_call("apply_patch", patch=patch)]},
                {"role": "tool", "content": f"Applied patch to {f.name}: 1 file changed, 1 insertion(+)"},
            ]
        if rng.random() < 0.8:
            n = rng.randint(3, 40)
            messages += [
                {"role": "assistant", "content": "",
                 "reasoning_content": "Run the tests that cover this module.",
                 "tool_calls": [_call("run_tests", target=test_target)]},
                {"role": "tool", "content": f"collected {n} items\n\n{test_target} {'.' * n} [100%]\n\n"
                                            f"===== {n} passed in {rng.uniform(0.05, 9.0):.2f}s ====="},
            ]
        summary = first_paragraph(fn.doc)[:400]
        final = (f"已完成。`{fn.qualname}` 的作用：{summary}" if zh else
                 f"Done. `{fn.qualname}` ({f.name}, line {fn.lineno}): {summary}")
        messages.append({"role": "assistant", "content": final,
                         "reasoning_content": "Summarize what I checked and what changed."})
        yield ChatSample(f"builtin agentic #{i}", tuple(messages), tools)


# --------------------------------------------------------------------------------------------------------------------
# structured
# --------------------------------------------------------------------------------------------------------------------

FIRST = ("Ada", "Lin", "Grace", "Wei", "Alan", "Mei", "Ken", "Sofia", "Ivan", "Priya", "Omar", "Yuki", "Lars", "Ana")
LAST = ("Lovelace", "Zhang", "Hopper", "Chen", "Turing", "Wang", "Thompson", "Rossi", "Petrov", "Patel", "Haddad")
WORDS = ("silent", "river", "quantum", "garden", "copper", "signal", "northern", "lattice", "ember", "harbor", "delta")

# column name -> (SQL type, value generator)
Column = tuple[str, Callable[[random.Random, int], Any]]
TABLES: dict[str, dict[str, Column]] = {
    "employees": {
        "id": ("INTEGER", lambda r, i: 1000 + i),
        "name": ("TEXT", lambda r, i: f"{r.choice(FIRST)} {r.choice(LAST)}"),
        "department": ("TEXT", lambda r, i: r.choice(("research", "sales", "platform", "finance"))),
        "salary": ("REAL", lambda r, i: round(r.uniform(48_000, 190_000), 2)),
        "hired": ("DATE", lambda r, i: f"20{r.randint(10, 25):02d}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"),
    },
    "orders": {
        "order_id": ("TEXT", lambda r, i: f"ORD-{r.randint(10_000, 99_999)}"),
        "customer": ("TEXT", lambda r, i: f"{r.choice(FIRST)} {r.choice(LAST)}"),
        "product": ("TEXT", lambda r, i: f"{r.choice(WORDS)}-{r.choice(WORDS)}"),
        "quantity": ("INTEGER", lambda r, i: r.randint(1, 25)),
        "unit_price": ("REAL", lambda r, i: round(r.uniform(0.5, 400), 2)),
        "status": ("TEXT", lambda r, i: r.choice(("paid", "shipped", "refunded", "pending"))),
    },
    "sensors": {
        "sensor_id": ("TEXT", lambda r, i: f"s{r.randint(1, 64):03d}"),
        "location": ("TEXT", lambda r, i: r.choice(("roof", "lab-2", "basement", "north-wall"))),
        "temperature_c": ("REAL", lambda r, i: round(r.gauss(21, 6), 1)),
        "humidity": ("REAL", lambda r, i: round(r.uniform(15, 95), 1)),
        "recorded_at": ("TIMESTAMP", lambda r, i: f"2025-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T"
                                                  f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:00Z"),
    },
    "books": {
        "isbn": ("TEXT", lambda r, i: f"978-{r.randint(0, 9)}-{r.randint(1000, 9999)}-{r.randint(1000, 9999)}-"
                                      f"{r.randint(0, 9)}"),
        "title": ("TEXT", lambda r, i: f"The {r.choice(WORDS).title()} {r.choice(WORDS).title()}"),
        "author": ("TEXT", lambda r, i: f"{r.choice(FIRST)} {r.choice(LAST)}"),
        "year": ("INTEGER", lambda r, i: r.randint(1950, 2025)),
        "rating": ("REAL", lambda r, i: round(r.uniform(1, 5), 1)),
    },
}


def _sql_literal(v: Any) -> str:
    return str(v) if isinstance(v, int | float) else "'" + str(v).replace("'", "''") + "'"


def render_table(fmt: str, table: str, rows: list[dict[str, Any]]) -> str:
    """One table as JSON, YAML, CSV or SQL (CREATE TABLE + INSERT)."""
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False)
    if fmt == "yaml":
        return yaml.safe_dump({table: rows}, sort_keys=False, allow_unicode=True).rstrip()
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip()
    columns = TABLES[table]
    create = ",\n".join(f"  {c} {sql_type}" for c, (sql_type, _) in columns.items())
    values = ",\n".join("  (" + ", ".join(_sql_literal(r[c]) for c in columns) + ")" for r in rows)
    return f"CREATE TABLE {table} (\n{create}\n);\nINSERT INTO {table} ({', '.join(columns)}) VALUES\n{values};"


def _aggregate_answer(table: str, rows: list[dict[str, Any]], rng: random.Random) -> tuple[str, str]:
    columns = TABLES[table]
    numeric = [c for c, (t, _) in columns.items() if t in ("REAL", "INTEGER") and not c.endswith("id")]
    text = [c for c, (t, _) in columns.items() if t == "TEXT" and len({r[c] for r in rows}) < len(rows)]
    num, key = rng.choice(numeric), (rng.choice(text) if text else next(iter(columns)))
    groups: dict[Any, list[float]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r[num])
    result = "\n".join(f"| {k} | {sum(v) / len(v):.2f} | {len(v)} |" for k, v in sorted(groups.items()))
    query = f"SELECT {key}, AVG({num}) AS avg_{num}, COUNT(*) AS n\nFROM {table}\nGROUP BY {key}\nORDER BY {key};"
    question = f"Write a SQL query for the average {num} and the row count per {key}, and show its result."
    return question, f"```sql\n{query}\n```\n\n| {key} | avg_{num} | n |\n|---|---|---|\n{result}"


def _structured(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    formats = ("json", "yaml", "csv", "sql")
    for i in range(10**9):
        rng = random.Random(f"{seed}/{i}")
        table = rng.choice(sorted(TABLES))
        rows = [{c: gen(rng, k) for c, (_, gen) in TABLES[table].items()} for k in range(rng.randint(3, 12))]
        src = rng.choice(formats)
        data = f"```{src}\n{render_table(src, table, rows)}\n```"
        if src == "sql" and rng.random() < 0.5:
            question, answer = _aggregate_answer(table, rows, rng)
        else:
            dst = rng.choice([f for f in formats if f != src])
            question = rng.choice((f"Convert this {src.upper()} to {dst.upper()}.",
                                   f"请把下面的 {src.upper()} 转换成 {dst.upper()}。",
                                   f"I need the `{table}` data below as {dst.upper()}, same fields and order."))
            answer = f"```{dst}\n{render_table(dst, table, rows)}\n```"
        messages = ({"role": "system", "content": SYSTEM_EN[4] if rng.random() < 0.5 else SYSTEM_ZH[4]},
                    {"role": "user", "content": f"{question}\n\n{data}"},
                    {"role": "assistant", "content": answer})
        yield ChatSample(f"builtin structured #{i}", messages[rng.randint(0, 1):])


# --------------------------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------------------------

MODULE_QUESTIONS = ("What is the `{mod}` module for?", "I keep seeing `import {mod}` in code. What does it do?",
                    "`{mod}` 模块是做什么的？", "Give me a one-paragraph overview of Python's `{mod}`.")
FUNCTION_QUESTIONS = ("How do I use `{qual}`?", "What does `{qual}` do exactly?", "`{qual}` 怎么用？",
                      "Can you explain `{qual}` and its arguments?")
SOURCE_QUESTIONS = ("Can I see how it is implemented?", "Show me the source, please.", "能给我看一下它的实现吗？")


def _chat(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    files = code_files()
    for i in range(10**9):
        rng = random.Random(f"{seed}/{i}")
        f = _pick_documented(rng, files, need_module_doc=True)
        mod = module_name(f)
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_EN[:1] + SYSTEM_EN[5:] + SYSTEM_ZH[:1])})
        messages += [{"role": "user", "content": rng.choice(MODULE_QUESTIONS).format(mod=mod)},
                     {"role": "assistant", "content": first_paragraph(module_doc(f))}]
        fns = functions(f)
        for fn in rng.sample(fns, k=min(len(fns), rng.randint(1, 3))):
            qual = f"{mod}.{fn.qualname}"
            signature = fn.source.splitlines()[0].strip().removeprefix("async ").removeprefix("def ").rstrip(":")
            messages += [{"role": "user", "content": rng.choice(FUNCTION_QUESTIONS).format(qual=qual)},
                         {"role": "assistant", "content": f"Its signature is `{signature}`.\n\n{fn.doc}"}]
            if rng.random() < 0.3:
                source = "\n".join(fn.source.splitlines()[:60])
                messages += [{"role": "user", "content": rng.choice(SOURCE_QUESTIONS)},
                             {"role": "assistant",
                              "content": f"Here it is, from `{f.name}`:\n\n```python\n{source}\n```"}]
        messages[-1]["reasoning_content"] = f"The user asks about `{mod}`; answer from its documentation."
        yield ChatSample(f"builtin chat #{i} {mod}", tuple(messages))


# --------------------------------------------------------------------------------------------------------------------
# bilingual_system
# --------------------------------------------------------------------------------------------------------------------


def _bilingual(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    for i in range(10**9):
        rng = random.Random(f"{seed}/{i}")
        system = rng.choice(SYSTEM_ZH if rng.random() < 0.5 else SYSTEM_EN)
        question, answer = rng.choice(QA_ZH if rng.random() < 0.5 else QA_EN)
        yield ChatSample(f"builtin bilingual_system #{i}", (
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ))


# --------------------------------------------------------------------------------------------------------------------
# long_context
# --------------------------------------------------------------------------------------------------------------------

LONG_SYSTEM = ("You are a code reviewer. Read every file before answering.",
               "你是一名代码审查员。回答之前请通读所有文件。")


def _long_conversation(blocks: list[tuple[CodeFile, str]], question: str, answer: str,
                       system: str) -> tuple[dict[str, Any], ...]:
    quoted = "\n\n".join(f"### {f.name}\n```python\n{text}\n```" for f, text in blocks)
    return ({"role": "system", "content": system},
            {"role": "user", "content": f"Here are files from the repository.\n\n{quoted}\n\n{question}"},
            {"role": "assistant", "content": answer})


def _end_offset(f: CodeFile, fn: Function) -> int:
    """Characters of f's text up to the end of fn's last line."""
    return sum(len(line) for line in read_code(f).splitlines(keepends=True)[:fn.end_lineno])


def _long_qa(full: list[CodeFile], last: CodeFile, last_chars: int, rng: random.Random) -> tuple[str, str, int]:
    """A question about a documented function that is quoted whole: from a complete file, or from the part of the
    cut last file expected to survive (`last_chars`). Also returns how many characters of the last file it needs."""
    candidates = [(f, fn, 0) for f in full for fn in functions(f)]
    candidates += [(last, fn, end) for fn in functions(last) if (end := _end_offset(last, fn)) <= last_chars]
    if not candidates:
        names = ", ".join(f"`{f.name}`" for f in [*full, last])
        return "Which files did I send?", f"You sent {len(full) + 1} file(s), the last one cut short: {names}.", 0
    f, fn, need = rng.choice(candidates)
    return (f"Which of these files defines `{fn.qualname}`, and what is it for?",
            f"`{fn.qualname}` is defined in `{f.name}` at line {fn.lineno}. {first_paragraph(fn.doc)[:500]}", need)


def _fit(measure: Measure, full: list[tuple[CodeFile, str]], last: tuple[CodeFile, str], target: int,
         qa: tuple[str, str], system: str, origin: str) -> tuple[ChatSample, int] | None:
    """The sample with the longest prefix of the last file that stays at or under target tokens, and that prefix's
    length in characters; None when even an empty last file is too long."""
    def sample(k: int) -> ChatSample:
        return ChatSample(origin, _long_conversation(full + [(last[0], last[1][:k])], *qa, system))

    if measure(sample(0)) > target:
        return None
    lo, hi = 0, len(last[1])
    while lo < hi:  # largest k with measure(sample(k)) <= target; measure is monotone in k up to BPE merges
        mid = (lo + hi + 1) // 2
        if measure(sample(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return sample(lo), lo


def _long_context(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    """Whole files from a random starting point of the sorted file list (so neighbouring files of one package) until
    the rendered sample passes target_tokens; the last file is cut so the sample ends at most at target_tokens, and
    a question about a function quoted whole closes it.
    """
    target = p.target_tokens
    files = tuple(f for f in code_files(tuple(p.packages)) if read_code(f))
    for i in range(10**9):
        rng = random.Random(f"{seed}/{i}")
        start = rng.randrange(len(files))
        blocks: list[tuple[CodeFile, str]] = []
        sizes: list[int] = []
        for k in range(len(files)):
            f = files[(start + k) % len(files)]
            blocks.append((f, read_code(f)))
            # Tokens of the file alone are a close lower bound of what it adds to the rendered sample.
            sizes.append(measure(TextSample("", blocks[-1][1])))
            if sum(sizes) >= target:
                break
        system = rng.choice(LONG_SYSTEM)
        origin = f"builtin long_context #{i} (from {blocks[0][0].name})"
        while blocks:
            *full, last = blocks
            # 80% of the characters the remaining token budget should hold, so the question's function survives.
            room = max(0, target - sum(sizes[:-1])) / max(1, sizes[-1])
            question, answer, need = _long_qa([f for f, _ in full], last[0], int(0.8 * room * len(last[1])), rng)
            fitted = _fit(measure, full, last, target, (question, answer), system, origin)
            if fitted is not None and fitted[1] < need:
                question, answer, _ = _long_qa([f for f, _ in full], last[0], 0, rng)
                fitted = _fit(measure, full, last, target, (question, answer), system, origin)
            if fitted is not None:
                yield fitted[0]
                break
            blocks, sizes = full, sizes[:-1]


_GENERATORS: dict[BuiltinName, Callable[[BuiltinPass, int, Measure], Iterator[Sample]]] = {
    BuiltinName.CODE: _code,
    BuiltinName.AGENTIC: _agentic,
    BuiltinName.STRUCTURED: _structured,
    BuiltinName.CHAT: _chat,
    BuiltinName.BILINGUAL_SYSTEM: _bilingual,
    BuiltinName.LONG_CONTEXT: _long_context,
}


def generate(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    """The samples of builtin pass `p`, in order; generators other than code never run out."""
    return _GENERATORS[p.builtin](p, seed, measure)
