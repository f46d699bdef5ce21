"""Result files name their data set by a short tag ("cf", "zs"), so that no tracked file is named
like the CounterFact / ZsRE data, which is only ever read from ../shared/data."""

TAGS = {"counterfact": "cf", "zsre": "zs"}


def tag(setting: str) -> str:
    """"counterfact" -> "cf", "zsre-cross" -> "zs-cross"; anything else as it is."""
    for name, short in TAGS.items():
        if setting.startswith(name):
            return short + setting[len(name):]
    return setting
