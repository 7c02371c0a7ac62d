"""memoir.spelling: which written forms of a subject name it, and which other names do not."""
import pytest

from memoir import spelling
from memoir.types import EditRequest


class PieceTokenizer:
    """Splits every word into pieces of ``piece`` letters, except the listed whole words: a stand-in
    for a vocabulary where known names are one token and misspellings break apart."""

    def __init__(self, whole=(), piece=3):
        self.whole, self.piece = {w.casefold() for w in whole}, piece

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for word in text.split():
            n = 1 if word.casefold() in self.whole else -(-len(word) // self.piece)
            ids += [0] * n
        return {"input_ids": ids}


def index_of(*subjects, tokenizer=None, aliases=None):
    index = spelling.SpellingIndex(tokenizer)
    for i, s in enumerate(subjects):
        index.add(i, s, (aliases or {}).get(i, ()))
    return index


@pytest.mark.parametrize("query", [
    "The capital of Japan is", "the capital of JAPAN is", "Japan's capital is",   # as written, case, possessive
    "The capital of Japna is", "The capital of Japn is", "The capital of Jappan is",  # swap, drop, double
    "The capital of Jaoan is",                                                    # replace
])
def test_the_subject_and_its_misspellings_name_it(query):
    assert index_of("Japan").named(query) == {0}


def test_short_names_numbers_and_codes_must_be_exact():
    index = index_of("Iran", "Gregory IX", "Renault 25", "Chevrolet Chevette", "Renault 4CV")
    assert index.named("The capital of Iraq is") == set()          # 4 letters: no edit tolerated
    assert index.named("Gregory II holds the title of") == set()  # a roman numeral differs
    assert index.named("Renault 12 is made by") == set()
    assert index.named("Renault 4 is made by") == set()
    assert index.named("Chevrolet Chevelle is made by") == set()  # two edits in an 8-letter word
    assert index.named("Chevrolet Chevete is made by") == {3}     # one
    assert index.named("Gregroy IX holds the title of") == {1}


def test_long_words_tolerate_two_edits_and_spacing_may_change():
    index = index_of("Massachusetts Institute of Technology", "New York")
    assert index.named("Where is Massachusets Institute of Tecnology?") == {0}
    assert index.named("Where is Masachusets Institute of Tecnology?") == {0}   # two in one long word
    assert index.named("Where is Msachusets Institute of Technology?") == set()  # three
    assert index.named("the mayor of NewYork is") == {1}
    assert index.named("the mayor of new-york is") == {1}


def test_accents_and_punctuation_are_ignored():
    index = index_of("Zürich", "Berlin Tegel Airport")
    assert index.named("Where is Zurich?") == {0}
    assert index.named("Berlin-Tegel Airport, named for") == {1}


def test_an_acronym_needs_three_initials_and_capitals():
    index = index_of("United States of America", "Manchester United")
    assert index.named("The president of the USA is") == {0}
    assert index.named("tell usa about it") == set()      # not written in capitals
    assert index.named("The MU stadium is") == set()      # two initials collide too often


def test_aliases_are_forms_of_the_subject():
    index = index_of("United Kingdom", "Japan", aliases={0: ["UK", "Britain"], 1: ["Nippon"]})
    assert index.named("The capital of the UK is") == {0}
    assert index.named("The capital of Britian is") == {0}  # an alias misspelt
    assert index.named("The capital of Nippon is") == {1}


def test_a_misspelling_must_not_be_a_shorter_word_than_the_name():
    # "Paris" and "Parks" are both whole words: another name, not a typo; "Parsi" breaks apart.
    tok = PieceTokenizer(whole=["Paris", "Parks"])
    index = index_of("Paris", tokenizer=tok)
    assert index.named("The mayor of Parks is") == set()
    assert index.named("The mayor of Parsi is") == {0}
    assert index.named("The mayor of PARIS is") == {0}     # no edit needed: no token test
    assert index_of("Paris").named("The mayor of Parks is") == {0}  # without a tokenizer: no test


def test_no_subject_and_empty_index_name_nothing():
    index = spelling.SpellingIndex()
    assert index.named("anything at all") == set()
    index.add(0, None)
    index.add(1, "the")  # only a stop word: no form words to match
    assert index.named("the capital of the country") == set()


@pytest.mark.parametrize("a,b,d", [("japan", "japna", 1), ("japan", "japan", 0), ("abc", "", 3),
                                   ("kitten", "sitting", 3), ("ca", "ac", 1), ("abcd", "badc", 2)])
def test_edit_distance_counts_adjacent_swaps_as_one(a, b, d):
    assert spelling.edit_distance(a, b, 5) == d
    assert spelling.edit_distance(a, b, d) == d
    if d:
        assert spelling.edit_distance(a, b, d - 1) == d  # over the limit: limit + 1


def test_edit_requests_take_aliases_as_a_list_of_texts():
    r = EditRequest.coerce({"prompt": "p", "target": "t", "subject": "s", "aliases": ["a", "b"]})
    assert r.aliases == ("a", "b")
    assert EditRequest.coerce(("p", "t", "s", ["a"])).aliases == ("a",)
    assert EditRequest.coerce(("p", "t")).aliases == ()
    assert EditRequest.coerce({"prompt": "p", "target": "t", "aliases": None}).aliases == ()
    with pytest.raises(ValueError, match="aliases must be a list"):
        EditRequest.coerce({"prompt": "p", "target": "t", "aliases": "USA"})
    with pytest.raises(ValueError, match="each alias"):
        EditRequest.coerce({"prompt": "p", "target": "t", "aliases": ["ok", 3]})
    with pytest.raises(ValueError, match="each alias"):
        EditRequest.coerce({"prompt": "p", "target": "t", "aliases": [" "]})


def test_common_aliases_come_from_the_shipped_table_both_ways():
    index = index_of("Netherlands", "USA", "Mumbai")
    assert index.named("The capital of Holland is") == {0}
    assert index.named("The president of the United States is") == {1}
    assert index.named("The president of the U.S. is") == {1}
    assert index.named("The president of America is") == {1}
    assert index.named("Bombay is a city in") == {2}
    assert index.named("Tell us about the weather") == set()  # "US" only as written, in capitals
    plain = spelling.SpellingIndex()
    plain.add(0, "Netherlands", common=False)
    assert plain.named("The capital of Holland is") == set()
    assert spelling.common_aliases("the Netherlands") == ("Holland",)
    assert spelling.common_aliases("Atlantis") == ()


def test_capitalised_short_names_match_only_as_written():
    assert spelling.cased("US") and spelling.cased("U.S.") and spelling.cased("NYC")
    assert not spelling.cased("Us") and not spelling.cased("NASDAQ") and not spelling.cased("A")
    index = index_of("United Kingdom", aliases={0: ["UK"]})
    assert index.named("the UK is") == index.named("the U.K. is") == {0}
    assert index.named("the uk is") == set()
    assert index.named("the UX is") == set()  # no typos in a cased name


def test_a_longer_name_or_an_added_ending_does_not_name_the_subject():
    index = index_of("Guinea", "Manchester", "Azerbaijan", "Japan")
    assert index.named("In Papua New Guinea, the language spoken is") == set()
    assert index.named("The University of Manchester is in") == set()
    assert index.named("Azerbaijani is spoken in") == set()
    assert index.named("Japan Airlines flies to") == set()
    assert index.named("Guinea is a country in") == {0}            # opens the sentence
    assert index.named("Tell me more. Manchester is in") == {1}
    assert index.named("The capital of Japan is") == {3}
    assert index.named("THE CAPITAL OF JAPAN IS") == {3}           # capitals everywhere: nothing is cut
    assert index.named("Where is Azerbajan?") == {2}               # a typo, not an ending


def test_a_leading_article_and_a_plural_s_still_name_the_subject():
    index = index_of("The Fratellis", "Derek Whitehead")
    assert index.named("(As of 2017.) The Fratellis, created in") == {0}
    assert index.named("The language of The Fratellis is") == {0}
    assert index.named("What was the name of the Derek Whiteheads team?") == {1}
