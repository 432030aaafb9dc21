"""The rater guidelines shown on the Chat and Compare tabs: what to reward, so that votes
from strangers agree on what "better" means. The Space owner sets the text."""

from __future__ import annotations

import logging

from rlhf_demo.config import Settings

log = logging.getLogger(__name__)
GUIDELINES_FILE = "guidelines.md"  # in the data dir
MAX_GUIDELINES_CHARS = 20_000  # a page of advice; a larger file is a mistake, not guidelines

DEFAULT_GUIDELINES = """\
**What to reward.** Vote for the answer you would rather receive:

- **Correct** beats fluent: a wrong fact is worse than a short answer.
- **Helpful**: it does what was asked, at a sensible length.
- **Safe and polite**: no harmful instructions, no insults.

👍/👎 rate one answer; on the Compare tab pick the better of two (*Tie* when they are as good,
*Both bad* when neither helps). After a 👎 or an A/B vote you may add reason tags and a short
comment. Votes, tags and comments may be published as an open dataset: never write personal
information.
"""


def guidelines_markdown(settings: Settings) -> str:
    """The owner's text: the environment's, else ``guidelines.md`` in the data dir, else the default."""
    if settings.ui.guidelines.strip():
        return settings.ui.guidelines[:MAX_GUIDELINES_CHARS]
    path = settings.data_dir / GUIDELINES_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DEFAULT_GUIDELINES
    except (OSError, UnicodeDecodeError) as exc:  # a broken file must not take the app down
        log.warning("could not read %s (%s); showing the default guidelines", path, exc)
        return DEFAULT_GUIDELINES
    return text[:MAX_GUIDELINES_CHARS] if text.strip() else DEFAULT_GUIDELINES
