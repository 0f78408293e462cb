"""Publish a saved model directory on the Hugging Face Hub, with its model card.

    python -m tools.publish checkpoints/self-further-pretrain-20000/cub me/vit-mae-base-cub-self-distilled
    python -m tools.publish results/cub/self-further-pretrain-20000/seed1/model me/vit-base-cub --private
    python -m tools.publish DIR REPO_ID --dry_run      # the files that would go; nothing written or uploaded

DIR is a directory a stage saved: a checkpoint of pretrain.py / selftrain.py, or a classifier of
`finetune.py --save_model` (<run>/model/). Its card (README.md) is first written again from the run's records
(outputs/card.py): its snippets then load REPO_ID, and a classifier's card lists every seed's result that
exists by now. A card edited by hand is never replaced: publishing stops, unless --keep_card uploads it as is.

What goes: every file of DIR but the run's private ones: the lock (.lock), the resumable state
(train_state.pt), temporary files (*.tmp<pid>), hidden files and folders (.saving/, .cache/), subfolders, and
names matching --exclude. The run record (args.json: the arguments and command, library versions, the host
name and local paths), metrics.jsonl, loss_curves.png and TensorBoard event files do go: they are what the card
cites (the Hub shows event files as training metrics); `--exclude args.json` keeps the record private.

Needs the Hub (network, HF_HUB_OFFLINE unset) and a login (`hf auth login`, or HF_TOKEN); without either it
says so in one line and changes nothing.
"""
import argparse
import fnmatch
import os

import outputs
import training
import utils
from models import hub
from outputs.card import CARD_FILE, card_state, model_card, write_card

LEFT_OUT = {training.LOCK_FILE: "the run's lock", training.STATE_FILE: "the resumable training state",
            ".saving": "an unfinished save"}
NEEDED = (CARD_FILE, "config.json", "model.safetensors", hub.PROCESSOR_FILE)  # never excluded


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Upload a saved model directory, with its model card, to the Hub.",
                                allow_abbrev=False)
    p.add_argument("model_dir", help="a directory written by pretrain.py / selftrain.py, or finetune.py "
                                     "--save_model's <run>/model/")
    p.add_argument("repo_id", help="the Hub repository, owner/name (created if it does not exist)")
    p.add_argument("--private", action="store_true",
                   help="create the repository private (an existing repository keeps its visibility)")
    p.add_argument("--revision", default=None, help="the branch to commit to, created if missing (default: main)")
    p.add_argument("--license", default=None,
                   help="a Hub licence identifier for the card's metadata (e.g. apache-2.0) once you have checked "
                        "the terms of θ₀ and of the dataset (the card links them); default: other")
    p.add_argument("--datasets", nargs="+", default=None, metavar="ID",
                   help="Hub dataset ids for the card's metadata (default: the dataset's name in this repository)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out the files whose names match this shell pattern (repeatable); never the "
                        "files loading needs (config.json, model.safetensors, preprocessor_config.json, README.md)")
    p.add_argument("--keep_card", action="store_true",
                   help="upload README.md as it is instead of writing it again from the run's records")
    p.add_argument("--commit_message", default=None, help="default: 'Upload <directory name> with its model card'")
    p.add_argument("--dry_run", action="store_true",
                   help="list the files that would be uploaded and those left out; write and upload nothing")
    return p


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be asked from here (None: it can), decided as the stages decide it for θ₀."""
    return hub._hub_offline_reason()


def select_files(model_dir: str, exclude: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names to upload, [(name, why it stays here)]) of model_dir's entries."""
    upload, left_out = [], []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        matched = next((pattern for pattern in exclude if fnmatch.fnmatch(name, pattern)), None)
        if name in LEFT_OUT:
            left_out.append((name, LEFT_OUT[name]))
        elif outputs.TEMPORARY_NAME.search(name):
            left_out.append((name, "a temporary file"))
        elif name.startswith("."):
            left_out.append((name, "hidden"))
        elif not os.path.isfile(path):
            left_out.append((name, "a folder"))
        elif matched:
            left_out.append((name, f"--exclude {matched}"))
        else:
            upload.append(name)
    return upload, left_out


def check_model_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise utils.UserError(f"not a directory: {model_dir}")
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise utils.UserError(f"{model_dir} has no {name}: not a finished model directory (the stages write "
                                  f"model.safetensors last)")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise utils.UserError(f"'{repo_id}' is not a Hub repository id ({str(e).splitlines()[0]})") from None
    if repo_id.count("/") != 1:
        raise utils.UserError(f"'{repo_id}': give the repository as owner/name (your user or organisation name)")


def _size(nbytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


def hub_token() -> str:
    from huggingface_hub import get_token
    token = get_token()  # HF_TOKEN, or what `hf auth login` stored
    if token is None:
        raise utils.UserError("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN), "
                              "then publish again; nothing was uploaded")
    return token


def upload(model_dir: str, repo_id: str, names: list[str], args, message: str, token: str) -> str:
    """The commit's URL, after creating the repository (and branch) if needed and committing `names`."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(model_dir, n)) for n in names]
    try:
        api.create_repo(repo_id, private=args.private or None, exist_ok=True)
        if args.revision not in (None, "main"):
            api.create_branch(repo_id, branch=args.revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=args.revision)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        error = utils.UserError if status in (400, 401, 403, 404, 409) else utils.RunFailed
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"the Hub answered {status or 'an error'} for {repo_id}: {detail}") from None
    except Exception as e:  # the network went away: httpx's and the OS's errors share no base class
        raise utils.RunFailed(f"uploading to {repo_id} failed ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or ['no detail'])[0]}); run it again to retry") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def main(args):
    model_dir = os.path.normpath(args.model_dir)
    check_model_dir(model_dir)
    check_repo_id(args.repo_id)
    state = card_state(model_dir)
    if args.keep_card and state == "missing":
        raise utils.UserError(f"--keep_card: {model_dir} has no {CARD_FILE} to upload")
    if state == "edited" and not args.keep_card:
        raise utils.UserError(f"{os.path.join(model_dir, CARD_FILE)} was edited by hand (or not written here), so it "
                              f"is not replaced: pass --keep_card to upload it as it is, or move it away to have a "
                              f"new one written from the run's records")
    card_kw = dict(repo_id=args.repo_id, license=args.license, datasets=args.datasets)
    if not args.keep_card:
        try:  # a directory without its run's records fails here, before anything
            model_card(model_dir, **card_kw)
        except utils.UserError as e:
            keep = f"; pass --keep_card to upload its {CARD_FILE} as it is" if state != "missing" else ""
            raise utils.UserError(f"{e}{keep}") from None
    names, left_out = select_files(model_dir, args.exclude)
    needed = [name for name, why in left_out if why.startswith("--exclude") and name in NEEDED]
    if needed:
        raise utils.UserError(f"--exclude would leave out {', '.join(needed)}, which loading the model needs")
    if CARD_FILE not in names:
        names = sorted([*names, CARD_FILE])  # written below
    message = args.commit_message or f"Upload {os.path.basename(model_dir)} with its model card"

    if args.dry_run:
        print(f"would upload {len(names)} files from {model_dir} to {args.repo_id} ({args.revision or 'main'}"
              f"{', private if new' if args.private else ''}):")
        for name in names:
            path = os.path.join(model_dir, name)
            size = _size(os.path.getsize(path)) if os.path.exists(path) else "-"
            note = "  (kept as it is)" if name == CARD_FILE and args.keep_card else \
                "  (written again from the run's records)" if name == CARD_FILE else ""
            print(f"  {name:32s} {size:>9s}{note}")
        if left_out:
            print("left out:")
            for name, why in left_out:
                print(f"  {name:32s} {why}")
        return

    offline = hub_offline_reason()
    if offline is not None:
        raise utils.UserError(f"cannot publish: {offline}; nothing was uploaded")
    token = hub_token()
    if not args.keep_card:
        write_card(model_dir, **card_kw)
    url = upload(model_dir, args.repo_id, names, args, message, token)
    print(f"published {len(names)} files of {model_dir} to https://huggingface.co/{args.repo_id}: {url}")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
