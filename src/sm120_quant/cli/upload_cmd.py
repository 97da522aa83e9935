"""`quantize upload`: send a finished checkpoint folder, its model card and provenance.json to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sm120_quant.cli.common import out


def upload(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder written by `quantize run` (it has "
                                                    "report.json).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repo to upload to, ORG/NAME.")],
    private: Annotated[bool, typer.Option("--private/--public",
                                          help="Visibility of a repo this creates; an existing repo keeps its own.")]
    = True,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (main when not given), created from "
                                                     "main when missing.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the files with sizes and sha256, what would be "
                                                            "created and the model card; send nothing, write no card.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Upload although the checkpoint doctor or verify did not "
                                                        "pass; the model card says so.")] = False,
) -> None:
    """Upload CHECKPOINT with a generated model card (README.md) and provenance.json as one commit; print its URL.

    Refused (exit 1) unless the run's checkpoint check and verify passed; --force uploads anyway, and the card says so.

    Re-running after an interruption resumes: what the Hub already holds is not sent again.

    The token comes from HF_TOKEN or `hf auth login`.
    """
    from sm120_quant.exporters.hub import describe, upload_checkpoint

    result = upload_checkpoint(checkpoint, repo_id, private=private, revision=revision, dry_run=dry_run, force=force,
                               progress=True)
    out.print(describe(result) if dry_run else result.commit_url, markup=False, emoji=False,
              end="" if dry_run else "\n")
