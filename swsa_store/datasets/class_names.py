"""Human-readable class names for prompts (SWSA paper, Appendix A).

* :data:`FLOWERS_102_NAMES` — the 102 Oxford Flowers class names, which the official archive
  does not contain (``imagelabels.mat`` holds only the numbers 1..102). Label ``k`` (1-based)
  is ``FLOWERS_102_NAMES[k - 1]``; the list is the one published with the dataset's
  category page and used by torchvision / CLIP.
* :func:`clean_class_name` — the cleaned name of a class for a given dataset:

  - CUB-200-2011: the ``NNN.`` prefix removed, underscores to spaces, lower case:
    ``001.Black_footed_Albatross`` -> ``"black footed albatross"``;
  - MVTec-AD / VisA: trailing numbers removed, underscores to spaces, run-together words split
    and acronyms written out: ``pcb1`` -> ``"printed circuit board"``, ``macaroni2`` ->
    ``"macaroni"``, ``metal_nut`` -> ``"metal nut"``, ``chewinggum`` -> ``"chewing gum"``;
  - Tiny-ImageNet: the first synonym of the WordNet id's entry in ``words.txt`` (passed in by
    the loader), e.g. ``n01443537`` -> ``"goldfish"``;
  - anything else: underscores to spaces, lower case.
"""

from __future__ import annotations

import re

__all__ = ["ACRONYMS", "FLOWERS_102_NAMES", "JOINED_WORDS", "clean_class_name"]

#: Oxford Flowers-102 class names; ``imagelabels.mat`` label k is ``FLOWERS_102_NAMES[k - 1]``.
FLOWERS_102_NAMES: tuple[str, ...] = (
    'pink primrose', 'hard-leaved pocket orchid', 'canterbury bells', 'sweet pea',
    'english marigold', 'tiger lily', 'moon orchid', 'bird of paradise', 'monkshood',
    'globe thistle', 'snapdragon', "colt's foot", 'king protea', 'spear thistle', 'yellow iris',
    'globe-flower', 'purple coneflower', 'peruvian lily', 'balloon flower', 'giant white arum lily',
    'fire lily', 'pincushion flower', 'fritillary', 'red ginger', 'grape hyacinth', 'corn poppy',
    'prince of wales feathers', 'stemless gentian', 'artichoke', 'sweet william', 'carnation',
    'garden phlox', 'love in the mist', 'mexican aster', 'alpine sea holly', 'ruby-lipped cattleya',
    'cape flower', 'great masterwort', 'siam tulip', 'lenten rose', 'barbeton daisy', 'daffodil',
    'sword lily', 'poinsettia', 'bolero deep blue', 'wallflower', 'marigold', 'buttercup',
    'oxeye daisy', 'common dandelion', 'petunia', 'wild pansy', 'primula', 'sunflower',
    'pelargonium', 'bishop of llandaff', 'gaura', 'geranium', 'orange dahlia',
    'pink-yellow dahlia?', 'cautleya spicata', 'japanese anemone', 'black-eyed susan', 'silverbush',
    'californian poppy', 'osteospermum', 'spring crocus', 'bearded iris', 'windflower',
    'tree poppy', 'gazania', 'azalea', 'water lily', 'rose', 'thorn apple', 'morning glory',
    'passion flower', 'lotus', 'toad lily', 'anthurium', 'frangipani', 'clematis', 'hibiscus',
    'columbine', 'desert-rose', 'tree mallow', 'magnolia', 'cyclamen', 'watercress', 'canna lily',
    'hippeastrum', 'bee balm', 'ball moss', 'foxglove', 'bougainvillea', 'camellia', 'mallow',
    'mexican petunia', 'bromelia', 'blanket flower', 'trumpet creeper', 'blackberry lily',
)

#: Acronyms written out in MVTec-AD / VisA product names.
ACRONYMS: dict[str, str] = {"pcb": "printed circuit board"}

#: Run-together product names split into words.
JOINED_WORDS: dict[str, str] = {"chewinggum": "chewing gum"}


def _plain(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split()).lower()


def clean_class_name(dataset: str, name: str) -> str:
    """The cleaned, human-readable name of class ``name`` of ``dataset`` (for prompts)."""
    kind = dataset.lower()
    if kind in ("cub", "cub200", "cub_200_2011"):
        return _plain(re.sub(r"^\d+\.", "", name))
    if kind in ("mvtec", "mvtec_ad", "visa"):
        words = []
        for word in _plain(re.sub(r"\d+$", "", name)).split():
            word = re.sub(r"\d+$", "", word)
            word = JOINED_WORDS.get(word, word)
            words.append(ACRONYMS.get(word, word))
        return " ".join(w for w in words if w)
    return _plain(name)
