"""Find, parse and validate recipes; every problem becomes one line naming the file, the line and the key."""

from __future__ import annotations

import difflib
import hashlib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from sm120_quant.errors import UserError
from sm120_quant.recipes.schema import Recipe

BUNDLED_PACKAGE = "sm120_quant.recipes"


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    text: str

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".yaml").removesuffix(".yml")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe file names (with .yaml) -> their paths inside the installed package."""
    folder = resources.files(BUNDLED_PACKAGE).joinpath("bundled")
    return {p.name: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path that exists wins; otherwise a bundled recipe of that name (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    for candidate in (name_or_path, f"{name_or_path}.yaml"):
        if candidate in bundled:
            return bundled[candidate]
    if path.exists():
        raise UserError(f"{name_or_path}: is a folder, not a recipe file; pass a .yaml file")
    close = difflib.get_close_matches(path.name, list(bundled), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"{name_or_path}: no such file and no bundled recipe of that name; {hint}"
                    "`quantize recipes` lists the bundled ones")


def load_recipe(name_or_path: str | Path) -> LoadedRecipe:
    path = resolve_recipe_path(str(name_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e}); pass a UTF-8 YAML file") from None
    return LoadedRecipe(parse_recipe(text, source=str(path), base_dir=path.parent), path, text)


def parse_recipe(text: str, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate recipe YAML text; relative data paths in it resolve against `base_dir` (the recipe's folder)."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML ({problem}); fix the syntax at that line") from None
    if data is None:
        raise UserError(f"{source}: the recipe is empty; it needs at least model, scheme, engine, calibration "
                        "and export (see `quantize show tiny-glm47-nvfp4.yaml`)")
    if not isinstance(data, dict):
        raise UserError(f"{source}:1: a recipe is a mapping of keys (model:, scheme:, ...), not a "
                        f"{type(data).__name__}")
    try:
        return Recipe.model_validate(data, context={"base_dir": base_dir} if base_dir else None)
    except ValidationError as e:
        raise UserError("; ".join(_describe(err, node, source) for err in e.errors())) from None


def _describe(err: dict, root: yaml.Node | None, source: str) -> str:
    line, loc = _locate(root, tuple(err["loc"]))
    where = f"{source}:{line}" if line else source
    dotted = ".".join(str(p) for p in loc) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _field_names(Recipe, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{where}: unknown key {dotted!r}; {hint}"
    if kind == "missing":
        return f"{where}: required key {dotted!r} is missing; add it"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{where}: {dotted}: {msg}{shown}"


def _locate(node: yaml.Node | None, loc: tuple) -> tuple[int | None, tuple]:
    """1-based line of the deepest YAML node on `loc` (a missing key points at its parent mapping), and `loc` without
    the union tags pydantic inserts (a discriminated pass's `source` value after its list index)."""
    line = node.start_mark.line + 1 if node is not None else None
    clean: list = []
    for i, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            if i > 0 and isinstance(loc[i - 1], int) and i + 1 < len(loc) and any(
                    isinstance(v, yaml.ScalarNode) and v.value == str(part) for _, v in node.value):
                continue  # the discriminator's value (e.g. `source: builtin`), not a key
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                clean.extend(loc[i:])
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            node = None
        clean.append(part)
    return line, tuple(clean)


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at `loc`, walking nested models, lists and tagged unions of the schema."""
    candidates: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for m in candidates:
            field = m.model_fields.get(str(part))
            if field is not None:
                nxt.extend(_models_in(field.annotation))
        candidates = nxt
    return sorted({name for m in candidates for name in m.model_fields})


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (list, tuple, dict, typing.Union, types.UnionType) or origin is not None:
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return []


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML that `parse_recipe` reads back to an equal Recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
