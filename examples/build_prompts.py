"""Build gkd's own chat prompt dataset from built-in tables: no downloads, same output for the same seed.

    python examples/build_prompts.py --output_dir examples/data/prompts

Each record is {"messages": [user question, short reference answer]} plus, where a short checkable answer exists,
"answers": strings of which any one in a reply counts as correct (the first is canonical and appears in the
reference answer; the others are accepted spellings and synonyms). The splits are disjoint by fact, not only by
wording: when "What is the capital of France?" is a validation question, no train question asks for France's
capital in other words either.
"""

import argparse
import json
import random
import sys
from pathlib import Path

CAPITALS = [  # country, capital, other accepted spellings of (country, capital)
    ("France", "Paris", (), ()), ("Germany", "Berlin", (), ()), ("Italy", "Rome", (), ()),
    ("Spain", "Madrid", (), ()), ("Portugal", "Lisbon", (), ()),
    ("the United Kingdom", "London", ("UK", "Britain"), ()),
    ("Ireland", "Dublin", (), ()), ("the Netherlands", "Amsterdam", ("Holland",), ()), ("Belgium", "Brussels", (), ()),
    ("Austria", "Vienna", (), ()), ("Poland", "Warsaw", (), ()), ("Sweden", "Stockholm", (), ()),
    ("Norway", "Oslo", (), ()), ("Finland", "Helsinki", (), ()), ("Denmark", "Copenhagen", (), ()),
    ("Greece", "Athens", (), ()), ("Hungary", "Budapest", (), ()), ("the Czech Republic", "Prague", ("Czechia",), ()),
    ("Russia", "Moscow", (), ()), ("Ukraine", "Kyiv", (), ("Kiev",)), ("Turkey", "Ankara", ("Türkiye",), ()),
    ("Egypt", "Cairo", (), ()), ("Kenya", "Nairobi", (), ()), ("Nigeria", "Abuja", (), ()),
    ("Morocco", "Rabat", (), ()), ("Ghana", "Accra", (), ()), ("Ethiopia", "Addis Ababa", (), ()),
    ("Japan", "Tokyo", (), ()), ("China", "Beijing", (), ()), ("India", "New Delhi", (), ("Delhi",)),
    ("South Korea", "Seoul", (), ()), ("Thailand", "Bangkok", (), ()), ("Vietnam", "Hanoi", (), ()),
    ("the Philippines", "Manila", (), ()), ("Australia", "Canberra", (), ()), ("New Zealand", "Wellington", (), ()),
    ("Canada", "Ottawa", (), ()), ("the United States", "Washington, D.C.", ("USA", "America"), ("Washington",)),
    ("Mexico", "Mexico City", (), ()), ("Brazil", "Brasília", (), ("Brasilia",)),
    ("Argentina", "Buenos Aires", (), ()), ("Chile", "Santiago", (), ()), ("Peru", "Lima", (), ()),
    ("Colombia", "Bogotá", (), ("Bogota",)), ("Iran", "Tehran", (), ()), ("Saudi Arabia", "Riyadh", (), ()),
    ("Pakistan", "Islamabad", (), ()), ("Cuba", "Havana", (), ()),
]
COLOURS = [
    ("a ripe banana", "yellow"), ("grass", "green"), ("the sky on a clear day", "blue"), ("fresh snow", "white"),
    ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"), ("milk", "white"), ("a lemon", "yellow"),
    ("an emerald", "green"), ("a ruby", "red"), ("a sapphire", "blue"), ("milk chocolate", "brown"),
    ("a polar bear's fur", "white"), ("a flamingo", "pink"), ("a crow", "black"), ("a ripe orange", "orange"),
    ("a ripe strawberry", "red"), ("a lime", "green"), ("a pumpkin", "orange"), ("blood", "red"),
    ("charcoal", "black"), ("an aubergine", "purple"), ("lavender flowers", "purple"), ("a cucumber", "green"),
    ("table salt", "white"), ("a raven", "black"), ("a tree trunk", "brown"), ("a school bus in the United States",
    "yellow"), ("a lettuce leaf", "green"),
]
OPPOSITES = [  # word, opposite(s), the first canonical
    ("hot", ("cold",)), ("big", ("small", "little")), ("happy", ("sad", "unhappy")), ("fast", ("slow",)),
    ("up", ("down",)), ("tall", ("short",)), ("open", ("closed", "shut")), ("full", ("empty",)),
    ("early", ("late",)), ("wet", ("dry",)), ("rich", ("poor",)), ("strong", ("weak",)), ("clean", ("dirty",)),
    ("thick", ("thin",)), ("high", ("low",)), ("push", ("pull",)), ("win", ("lose",)), ("day", ("night",)),
    ("buy", ("sell",)), ("true", ("false",)), ("always", ("never",)), ("first", ("last",)),
    ("inside", ("outside",)), ("friend", ("enemy", "foe")), ("love", ("hate",)), ("cheap", ("expensive",)),
    ("noisy", ("quiet", "silent")), ("remember", ("forget",)), ("arrive", ("leave", "depart")),
    ("increase", ("decrease", "reduce")), ("asleep", ("awake",)), ("north", ("south",)), ("east", ("west",)),
    ("heavy", ("light",)), ("young", ("old",)), ("begin", ("end", "finish")), ("question", ("answer",)),
    ("smooth", ("rough",)), ("safe", ("dangerous", "unsafe")), ("above", ("below", "beneath")),
]
PLURALS = [
    ("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("man", "men"), ("woman", "women"),
    ("tooth", "teeth"), ("foot", "feet"), ("goose", "geese"), ("person", "people"), ("sheep", "sheep"),
    ("deer", "deer"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("life", "lives"),
    ("baby", "babies"), ("city", "cities"), ("party", "parties"), ("potato", "potatoes"), ("tomato", "tomatoes"),
    ("hero", "heroes"), ("bus", "buses"), ("church", "churches"), ("dish", "dishes"), ("glass", "glasses"),
    ("ox", "oxen"), ("fungus", "fungi"), ("crisis", "crises"), ("phenomenon", "phenomena"),
    ("criterion", "criteria"), ("day", "days"), ("key", "keys"), ("toy", "toys"), ("piano", "pianos"),
    ("photo", "photos"), ("half", "halves"), ("roof", "roofs"), ("louse", "lice"), ("series", "series"),
]
ANIMAL_SOUNDS = [  # animal, sound(s), the first canonical
    ("cow", ("moo",)), ("dog", ("woof", "bark")), ("cat", ("meow", "miaow", "purr")), ("duck", ("quack",)),
    ("sheep", ("baa", "bleat")), ("pig", ("oink", "grunt")), ("horse", ("neigh", "whinny")), ("lion", ("roar",)),
    ("snake", ("hiss",)), ("owl", ("hoot", "twit-twoo")), ("frog", ("ribbit", "croak")),
    ("rooster", ("cock-a-doodle-doo", "crow")), ("bee", ("buzz",)), ("mouse", ("squeak",)),
    ("donkey", ("hee-haw", "bray")), ("wolf", ("howl", "awoo")), ("chicken", ("cluck",)), ("crow", ("caw",)),
    ("elephant", ("trumpet",)), ("turkey", ("gobble",)),
]
LEGS = [
    ("spider", 8, "eight"), ("ant", 6, "six"), ("dog", 4, "four"), ("chicken", 2, "two"), ("bee", 6, "six"),
    ("horse", 4, "four"), ("cat", 4, "four"), ("butterfly", 6, "six"), ("crab", 10, "ten"), ("duck", 2, "two"),
    ("cow", 4, "four"), ("beetle", 6, "six"), ("ostrich", 2, "two"), ("scorpion", 8, "eight"),
    ("penguin", 2, "two"), ("elephant", 4, "four"), ("frog", 4, "four"), ("flamingo", 2, "two"),
    ("lobster", 10, "ten"), ("grasshopper", 6, "six"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30),
          ("July", 31), ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31)]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth"]
UNITS = [  # large unit, small unit, how many small units in one large unit
    ("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("days", "hours", 24),
    ("litres", "millilitres", 1000), ("weeks", "days", 7), ("years", "months", 12), ("feet", "inches", 12),
]
DEFINITIONS = [
    ("photosynthesis", "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make "
     "sugar and release oxygen."),
    ("gravity", "Gravity is the force that pulls objects with mass towards each other, which is why things fall."),
    ("democracy", "Democracy is a system of government in which citizens choose their leaders by voting."),
    ("volcano", "A volcano is an opening in the Earth's crust through which molten rock, ash and gases escape."),
    ("mammal", "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk."),
    ("planet", "A planet is a large round body that orbits a star, as the Earth orbits the Sun."),
    ("noun", "A noun is a word that names a person, place, thing or idea."),
    ("verb", "A verb is a word that describes an action or a state, such as 'run' or 'be'."),
    ("adjective", "An adjective is a word that describes a noun, such as 'red' or 'happy'."),
    ("evaporation", "Evaporation is the change of a liquid into a gas, as when puddles dry in the sun."),
    ("habitat", "A habitat is the natural home or environment of an animal or plant."),
    ("island", "An island is a piece of land completely surrounded by water."),
    ("recipe", "A recipe is a list of ingredients with instructions for preparing a dish."),
    ("algorithm", "An algorithm is a step-by-step procedure for solving a problem or doing a task."),
    ("fraction", "A fraction is a number that represents part of a whole, such as one half."),
    ("prime number", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
    ("synonym", "A synonym is a word that means the same or nearly the same as another word."),
    ("antonym", "An antonym is a word whose meaning is the opposite of another word's."),
    ("century", "A century is a period of one hundred years."),
    ("continent", "A continent is one of the Earth's seven great land masses, such as Africa or Asia."),
    ("glacier", "A glacier is a large, slow-moving mass of ice formed from compacted snow."),
    ("vaccine", "A vaccine is a substance that trains the immune system to protect the body against a disease."),
    ("thermometer", "A thermometer is an instrument that measures temperature."),
    ("orbit", "An orbit is the curved path of an object around a star, planet or moon."),
    ("herbivore", "A herbivore is an animal that eats only plants."),
    ("carnivore", "A carnivore is an animal that eats mainly meat."),
    ("peninsula", "A peninsula is a piece of land almost surrounded by water but joined to the mainland."),
    ("metaphor", "A metaphor describes something as if it were something else, as in 'time is money'."),
    ("library", "A library is a place where books and other materials are kept for people to read or borrow."),
    ("ecosystem", "An ecosystem is a community of living things together with the environment they live in."),
]
SENTENCES = [
    ("the ocean", "The ocean covers about seventy percent of the Earth's surface."),
    ("the Moon", "The Moon orbits the Earth about once every twenty-seven days."),
    ("elephants", "Elephants are the largest land animals and use their trunks to drink, smell and grab food."),
    ("autumn", "In autumn many trees lose their leaves after they turn red, orange and yellow."),
    ("coffee", "Coffee is brewed from roasted beans and many people drink it in the morning to feel awake."),
    ("the internet", "The internet is a worldwide network of computers that lets people share information."),
    ("mountains", "Mountains are high landforms, and the highest of them, Mount Everest, rises 8,849 metres."),
    ("rain", "Rain falls when water droplets in clouds grow too heavy to stay in the air."),
    ("bicycles", "Bicycles are a cheap, quiet and healthy way to travel short distances."),
    ("honeybees", "Honeybees collect nectar from flowers and turn it into honey in their hives."),
    ("the Sahara Desert", "The Sahara is the largest hot desert in the world and stretches across northern Africa."),
    ("chess", "Chess is a strategy game for two players in which each side tries to checkmate the other's king."),
    ("trees", "Trees take in carbon dioxide and give out the oxygen we breathe."),
    ("music", "Music is the art of arranging sounds in time, and every known culture makes it."),
    ("the Sun", "The Sun is a star at the centre of our solar system and gives the Earth light and heat."),
    ("penguins", "Penguins are birds that cannot fly but are excellent swimmers."),
    ("winter", "Winter is the coldest season of the year, and in many places it brings snow."),
    ("bread", "Bread is baked from a dough of flour and water, often with yeast to make it rise."),
    ("rivers", "Rivers carry fresh water from hills and mountains down to lakes and the sea."),
    ("the Eiffel Tower", "The Eiffel Tower is an iron tower in Paris that was completed in 1889."),
    ("dolphins", "Dolphins are intelligent mammals that live in the sea and breathe air through a blowhole."),
    ("friendship", "Friendship is a close bond between people who care about and support each other."),
    ("trains", "Trains run on rails and can carry many passengers or heavy goods over long distances."),
    ("chocolate", "Chocolate is made from the roasted seeds of the cacao tree."),
    ("the Amazon rainforest", "The Amazon rainforest in South America is home to millions of species of plants "
     "and animals."),
    ("snow", "Snow forms when water vapour in cold clouds freezes into ice crystals."),
    ("cats", "Cats are popular pets that sleep for much of the day and are skilled hunters."),
    ("books", "Books let people share stories and knowledge across distance and time."),
    ("gardening", "Gardening means growing plants such as flowers and vegetables, and many people find it relaxing."),
    ("stars", "Stars are huge balls of hot gas that shine because of nuclear reactions in their cores."),
    ("the human heart", "The human heart is a muscle that pumps blood around the body."),
    ("football", "Football is a team sport in which two teams of eleven players try to score goals."),
    ("clouds", "Clouds are made of tiny water droplets or ice crystals floating in the air."),
    ("owls", "Owls are birds that hunt mostly at night and can turn their heads a long way round."),
    ("the Great Wall of China", "The Great Wall of China was built over many centuries to protect against "
     "invasions."),
    ("tea", "Tea is made by pouring hot water over the dried leaves of the tea plant."),
    ("butterflies", "Butterflies start life as caterpillars before changing into winged insects."),
    ("the piano", "The piano makes sound when its keys move small hammers that strike strings."),
    ("volcanoes", "Volcanoes can erupt with lava, ash and gas, and some of them build new islands."),
    ("the desert", "Deserts receive very little rain, so their plants and animals are adapted to save water."),
]


def capital_items(rng):
    for country, capital, country_aliases, capital_aliases in CAPITALS:
        name = country.removeprefix("the ")
        capital_answers = [capital, *capital_aliases]
        country_answers = [name, *country_aliases]
        for question in (f"What is the capital of {country}?", f"Name the capital city of {country}.",
                         f"Which city is the capital of {country}?"):
            yield ("capital", country), question, _sentence(f"The capital of {country} is {capital}"), capital_answers
        yield ("capital", country), f"{capital} is the capital of which country?", \
            _sentence(f"{capital} is the capital of {country}"), country_answers


def arithmetic_items(rng):
    def item(op, a, b, result, phrasings, symbol):
        return ("arithmetic", op, a, b), rng.choice(phrasings).format(a=a, b=b), f"{a} {symbol} {b} = {result}.", \
            [str(result)]

    for a in range(2, 21):
        for b in range(2, 21):
            yield item("+", a, b, a + b, ("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}."), "+")
            if a > b:
                yield item("-", a, b, a - b, ("What is {a} minus {b}?", "Subtract {b} from {a}."), "-")
            if a <= 12 and b <= 12:
                yield item("x", a, b, a * b, ("What is {a} times {b}?", "What is {a} multiplied by {b}?"), "x")
            if a <= 10 and b <= 10:
                yield item("/", a * b, b, a, ("What is {a} divided by {b}?",), "/")


def colour_items(rng):
    for thing, colour in COLOURS:
        sentence = f"{thing[0].upper() + thing[1:]} {'are' if thing.endswith('s') else 'is'} {colour}."
        for question in (f"What colour is {thing}?", f"What is the usual colour of {thing}?"):
            yield ("colour", thing), question, sentence, [colour]


def opposite_items(rng):
    for word, opposites in OPPOSITES:
        answer = f"The opposite of '{word}' is '{opposites[0]}'" + "".join(f", or '{o}'" for o in opposites[1:]) + "."
        for question in (f"What is the opposite of '{word}'?", f"Give the antonym of the word '{word}'."):
            yield ("opposite", word), question, answer, list(opposites)


def plural_items(rng):
    for noun, plural in PLURALS:
        for question in (f"What is the plural of '{noun}'?", f"Complete the phrase: one {noun}, two ..."):
            yield ("plural", noun), question, f"The plural of '{noun}' is '{plural}'.", [plural]


def animal_sound_items(rng):
    for animal, sounds in ANIMAL_SOUNDS:
        answer = f"{_a(animal).capitalize()} goes '{sounds[0]}'" + "".join(f", or '{s}'" for s in sounds[1:]) + "."
        for question in (f"What sound does {_a(animal)} make?", f"What noise does {_a(animal)} make?"):
            yield ("sound", animal), question, answer, list(sounds)


def leg_items(rng):
    for animal, count, word in LEGS:
        answer = f"{_a(animal).capitalize()} has {word} ({count}) legs."
        for question in (f"How many legs does {_a(animal)} have?",
                         f"Count the legs of {_a(animal)}: how many are there?"):
            yield ("legs", animal), question, answer, [str(count), word]


def calendar_items(rng):
    for index, day in enumerate(DAYS):
        after, before = DAYS[(index + 1) % 7], DAYS[index - 1]
        yield ("day after", day), f"What day comes after {day}?", f"{after} comes after {day}.", [after]
        yield ("day before", day), f"What day comes before {day}?", f"{before} comes before {day}.", [before]
    for index, (month, days) in enumerate(MONTHS):
        after, before = MONTHS[(index + 1) % 12][0], MONTHS[index - 1][0]
        yield ("month after", month), f"Which month comes after {month}?", f"{after} comes after {month}.", [after]
        yield ("month before", month), f"Which month comes before {month}?", f"{before} comes before {month}.", \
            [before]
        yield ("month number", month), f"What is the {ORDINALS[index]} month of the year?", \
            f"The {ORDINALS[index]} month of the year is {month}.", [month]
        leap = " (29 in a leap year)" if month == "February" else ""
        yield ("month days", month), f"How many days are there in {month}?", f"{month} has {days} days{leap}.", \
            [str(days)]


def unit_items(rng):
    for large, small, factor in UNITS:
        for count in range(2, 11):
            result = count * factor
            answers = [f"{result:,}"] + ([str(result)] if result >= 1000 else [])
            question = rng.choice((f"How many {small} are there in {count} {large}?",
                                   f"Convert {count} {large} to {small}.", f"{count} {large} is how many {small}?"))
            yield ("unit", large, count), question, f"{count} {large} is {result:,} {small}.", answers


def definition_items(rng):
    for word, definition in DEFINITIONS:
        for question in (f"What does '{word}' mean?", f"Define '{word}' in one short sentence."):
            yield ("definition", word), question, definition, None


def sentence_items(rng):
    for topic, sentence in SENTENCES:
        for question in (f"Write one sentence about {topic}.", f"Tell me one fact about {topic} in a single sentence."):
            yield ("sentence", topic), question, sentence, None


CATEGORIES = [capital_items, arithmetic_items, colour_items, opposite_items, plural_items, animal_sound_items,
              leg_items, calendar_items, unit_items, definition_items, sentence_items]


def build(num_train: int, num_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw categories in turn (each shuffled), so both splits mix every kind of question; a fact whose question
    went to validation is never asked in train."""
    rng = random.Random(seed)
    queues = []
    for category in CATEGORIES:
        items = list(category(rng))
        rng.shuffle(items)
        queues.append(items)
    val, train, val_facts, seen_questions = [], [], set(), set()
    while any(queues) and len(train) < num_train:
        for queue in queues:
            if not queue:
                continue
            fact, question, answer, answers = queue.pop()
            if question in seen_questions:
                continue
            seen_questions.add(question)
            if len(val) < num_val:
                val.append(_record(question, answer, answers))
                val_facts.add(fact)
            elif fact not in val_facts and len(train) < num_train:
                train.append(_record(question, answer, answers))
    if len(val) < num_val or len(train) < num_train:
        raise ValueError(f"the tables hold only {len(val)} validation and {len(train)} train questions")
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."


def _record(question: str, answer: str, answers: list[str] | None) -> dict:
    record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if answers:
        record["answers"] = answers
    return record


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="examples/data/prompts", help="Folder for train.jsonl and val.jsonl.")
    parser.add_argument("--num_train", type=int, default=600, help="Train records.")
    parser.add_argument("--num_val", type=int, default=60, help="Validation records.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draw: the same seed gives the same files.")
    args = parser.parse_args(argv)
    try:
        train, val = build(args.num_train, args.num_val, args.seed)
    except ValueError as error:
        sys.exit(f"build_prompts.py: error: {error}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(output_dir / "train.jsonl", train)
    write_jsonl(output_dir / "val.jsonl", val)
    print(f"wrote {len(train)} train and {len(val)} validation records to {output_dir}")


if __name__ == "__main__":
    main()
