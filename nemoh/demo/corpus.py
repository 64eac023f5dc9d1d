"""Synthetic IT-helpdesk conversations with tool use and reasoning, for training the demo model.

`generate(split, n, seed)` returns structured OpenAI-style conversations (`Example`), each ending with the
assistant turn that an evaluation asks the model to produce (`Example.expected`). The "heldout" split
draws names, domains, products, issues, error strings and user phrasings from pools disjoint from
"train", so evaluation measures generalisation rather than recall.

Everything the model must put in a tool argument is copyable: it appears verbatim in the user message or
in an earlier tool result (ids, emails, titles, team names, reasons, queries). Two values are mapped, not
copied: a ticket's priority (an urgency phrase from a small fixed set decides it, see URGENCY) and its
category (the class of the issue, see ISSUES; held-out issues are unseen phrases of the same classes).

`render(example)` produces the training text with the Nemotron 3 chat template; `training_segments`
splits that text into (piece, is_target) so a trainer can put loss on assistant output only.

CLI: python -m nemoh.demo.corpus --split train --n 20000 --seed 0 --out train.jsonl [--render]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from nemoh.chat.template import ChatTemplate

TOOLS_PATH = Path(__file__).parent / "tools.json"
MODEL_DIR = Path(__file__).parent / "model"
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.25


@dataclass
class Example:
    """One conversation. The last message is the assistant turn to predict; `expected` describes it:
    `{"type": "tool_call", "name": str, "arguments": dict}` or `{"type": "no_tool", "kind": "answer" |
    "question"}`. `messages[:-1]` is the evaluation prompt."""
    messages: list[dict]
    tools: list[dict]
    template_kwargs: dict
    expected: dict
    turn_type: str
    intent: str
    split: str
    # Earlier requests, each resolved, come before the last one (train only); their assistant turns are
    # training targets too (see `training_segments`).
    history: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def load_tools() -> list[dict]:
    return json.loads(TOOLS_PATH.read_text())


# --------------------------------------------------------------------------- entity pools
# Each pool is split by position: the first 75% is "train", the rest "heldout" (disjoint by construction).

FIRST_NAMES = """Anna Ben Carla David Elena Farid Greta Hugo Ines Jonas Kira Liam Maya Noah Olga Pablo Quinn Rosa
Sami Tara Umar Vera Walt Xenia Yusuf Zoe Aaron Bella Caleb Dana Emil Fiona Gavin Hana Ivan Julia Kofi Lena Marco
Nadia Oscar Priya Rafael Sofia Theo Ursula Victor Wendy Yara Zane Amira Bruno Chloe Dmitri Esther Felix Gloria
Hiro Isla Jasper""".split()
LAST_NAMES = """Berg Chen Diaz Evans Fischer Garcia Hansen Ito Jensen Kowalski Lopez Meyer Novak Okafor Patel Quist
Rossi Silva Tanaka Umeh Varga Weber Xu Young Zimmer Adams Brooks Costa Dubois Eriksen Fontaine Gupta Haas Iyer
Jovanovic Keller Lindqvist Moreau Nakamura Olsen Petrov Reyes Schmidt Torres Ueda Vogel Walsh Yilmaz Ziegler
Alvarez Bianchi Castro Dahl Engel Ferreira Grant Hoffmann Ibarra Jaeger""".split()
DOMAINS = """contoso.com fabrikam.io northwind.org acme-corp.com initech.net globex.co umbrella.dev
tailspin.biz wingtip.org litware.com adatum.net proseware.io cyberdyne.ai hooli.xyz vandelay.com
stark-ind.com""".split()
COMPANIES = ["Contoso", "Fabrikam", "Northwind", "Acme", "Initech", "Globex", "Tailspin", "Wingtip"]
PRODUCTS = """Outlook Teams Excel Word Zoom Slack Salesforce SAP Jira Confluence Chrome Firefox Photoshop
AutoCAD Tableau PowerBI Webex OneDrive Dropbox Notion Figma Workday""".split()
ERRORS = ["error 0x80070005", "error 809", "ERR_CONNECTION_TIMED_OUT", "error 0x8004010F", "code 403 Forbidden",
          "error 1603", "code 500 Internal Server Error", "DNS_PROBE_FINISHED_NXDOMAIN", "error 0xC004F074",
          "error 691", "code 401 Unauthorized", "error 0x800CCC0E", "SSL_ERROR_BAD_CERT_DOMAIN",
          "error 720", "code 502 Bad Gateway", "error 0x80004005"]
# (title as the user says it, category). Titles with {product} get a product from the split's pool.
ISSUES = {
    "hardware": ["laptop will not turn on", "monitor keeps flickering", "keyboard is missing keys",
                 "docking station does not charge my laptop", "printer on floor 3 is jammed",
                 "laptop battery drains in an hour", "webcam shows a black image", "mouse stopped working"],
    "software": ["{product} crashes on startup", "{product} freezes when I save", "{product} will not install",
                 "{product} license expired", "{product} shows a blank window", "{product} is very slow",
                 "{product} update fails", "{product} keeps logging me out"],
    "network": ["VPN drops every few minutes", "office Wi-Fi is not reachable", "internet is very slow on floor 2",
                "cannot reach the intranet", "VPN will not connect from home", "network drive disconnects",
                "ethernet port at my desk is dead", "guest Wi-Fi password does not work"],
    "access": ["cannot open the finance shared drive", "no access to the HR folder", "badge does not open the lab",
               "need access to the sales dashboard", "permission denied on the project repo",
               "cannot see the team calendar", "locked out of the admin portal", "need rights to the build server"],
    "email": ["mailbox is full", "emails to customers bounce", "shared mailbox is missing",
              "calendar invites are not arriving", "spam filter blocks a vendor", "mail signature is gone",
              "cannot send attachments", "out of office reply does not work"],
    "other": ["need a new desk phone", "conference room screen is broken", "want to order a second monitor",
              "need a loaner laptop for travel", "projector remote is missing", "desk lamp request for IT",
              "headset for calls is needed", "cable for the meeting room TV is lost"],
}
KB_TOPICS = ["set up MFA on a new phone", "connect to the office Wi-Fi", "map a network drive",
             "configure the VPN client", "add a shared mailbox", "set an out of office reply",
             "install a printer", "change my password", "share a calendar", "clear the browser cache",
             "enable disk encryption", "join a Teams meeting by phone", "recover a deleted file",
             "set up email on my phone", "request software", "use the self-service portal"]
REASONS = ["the outage affects the whole floor", "it has been open for a week", "the customer demo is tomorrow",
           "the first fix did not help", "the CFO is blocked", "it looks like a security incident",
           "nobody has replied yet", "the deadline is today", "the problem keeps coming back",
           "payroll runs tonight", "a whole team cannot work", "the auditors need access this week"]
TEAMS = ["network", "security", "desktop", "identity", "messaging"]
CATEGORIES = list(ISSUES)

# Urgency phrase -> priority (1 urgent .. 4 low); the only mapping (not copying) the model must learn.
URGENCY = {1: ["this is urgent", "it's an emergency", "we are completely blocked"],
           2: ["please fix it today", "it's fairly important", "it's hurting my work"],
           3: ["no big hurry", "whenever you can this week", "it's a normal request"],
           4: ["low priority", "it can wait", "no rush at all"]}
# Train-only: a share of every kind of request starts with a capital, as people write. With only the
# problem reports below starting with one, runs/demo26 read a capital as "new problem" and opened a ticket
# for examples/ticket_agent.py's "How do I set up the VPN on a new laptop?".
CAPITALISED_RATE = 0.3
# Train-only ticket reports that start with the problem as a sentence, then the urgency.
TITLE_FIRST_PHRASES = ["{title}. {urgency}.", "{title}. Can someone look at it? {urgency}.", "{title}, {urgency}.",
                       "{title}. Please help. {urgency}!", "{title} since this morning. {urgency}.",
                       "{title}. Could somebody check? {urgency}.", "{title} again. {urgency}."]
# Train-only: a status question that also says what the ticket was about ("I opened it on Monday about the
# scanner") is still a status question, not a new problem (runs/demo24 opened a ticket for
# examples/ticket_agent.py's status question, which names its docking station).
STATUS_CONTEXT_RATE = 0.3
STATUS_CONTEXT = ["I opened it {when} about {thing}.", "It's about {thing}.", "I reported {thing} {when}.",
                  "That's the one about {thing}.", "It was about {thing}, opened {when}.",
                  "I logged it {when} because of {thing}."]
STATUS_CONTEXT_WHEN = ["yesterday", "on Monday", "two days ago", "this morning", "last week", "on Friday"]
# Train-only urgency phrases: the same four levels in other words, so that a priority is read from the meaning
# ("it's urgent", "not urgent") rather than from one of three fixed phrases (examples/ticket_agent.py's
# "It's urgent." was filed at priority 4 by runs/demo23's average weights). Held-out tickets keep URGENCY.
TRAIN_ONLY_URGENCY = {1: ["it's urgent", "urgent please", "this is critical", "ASAP please", "top priority",
                          "nobody can work"],
                      2: ["fairly urgent", "today if possible", "soon please", "it's important"],
                      3: ["when you have time", "normal priority", "sometime this week", "not too pressing"],
                      4: ["not urgent", "nothing urgent", "whenever, really", "lowest priority"]}


# Train-only made-up entities: a share of the training people, domains and how-to topics are invented, so
# that the model learns what an email or a topic looks like and copies it piece by piece, instead of
# recognising the few real names it was shown (held-out names are unseen, and a tiny model otherwise
# fails to notice an email it has no name for).
MADE_UP_RATE = 0.5
SYLLABLES = """ba be bo bri ca co da del dor el fa fen ga gil ha hol ja jo ka kel ko la lin lo ma mar mi
na nel no ol pa pel ra ren ro sa sel so ta tel to ul va vel vo wa win ya zo zel""".split()
MADE_UP_TLDS = ["com", "net", "org", "io", "co", "biz", "info", "dev", "tech", "app", "cloud", "eu"]
KB_VERBS = ["configure", "reset", "install", "remove", "update", "sync", "back up", "restore", "export",
            "rename", "share", "archive", "find", "print from", "connect to", "sign out of", "set up", "use"]
KB_OBJECTS = ["the shared printer", "my VPN profile", "a distribution list", "my browser bookmarks",
              "the team wiki", "a desk booking", "my laptop drivers", "a mailbox rule", "my phone contacts",
              "the meeting room display", "a code signing key", "my home directory", "the expense app",
              "a second screen", "the guest network", "my voicemail", "my new phone", "the printer driver",
              "a shared folder", "two-factor sign-in", "the wireless network", "the remote desktop",
              # how-tos about new equipment are IT questions, not shopping ones (runs/demo25 answered
              # examples/ticket_agent.py's VPN how-to as off-topic)
              "a new laptop", "my new monitor", "the new docking station", "a new tablet", "my new headset"]
# Train-only article snippets: a search result may carry a body, as real knowledge bases return one.
KB_BODIES = ["Step-by-step guide with screenshots.", "Open the settings page and follow the steps.",
             "Takes about five minutes.", "Needs admin rights on the device.", "Ask your manager to approve first.",
             "Works on Windows and macOS.", "Restart the device when it is done."]


# Train-only invented problems and escalation reasons. With a few titles per category the model learned the
# titles themselves and wrote one it knew ("need a loaner laptop for travel") for whatever it did not
# recognise, instead of copying the user's words (runs/demo18); put together from parts, a title cannot be
# recalled, only copied.
MADE_UP_PROBLEMS = {
    "hardware": (["my laptop screen", "the docking station in room {n}", "the printer on level {n}", "my headset",
                  "the badge reader", "my second monitor", "the USB-C hub", "my laptop fan", "the scanner",
                  "my desk phone", "the meeting room camera", "the printer on the {ordinal} floor",
                  "the projector on the {ordinal} floor", "the screen at my desk"],
                 ["is broken", "makes a loud noise", "stopped working", "does not power on", "is cracked",
                  "overheats", "shows no image", "beeps all the time", "keeps restarting every few minutes",
                  "keeps switching off"]),
    "software": (["{product}", "the {product} plugin", "the {product} app on my laptop"],
                 ["crashes when I open a file", "will not start", "hangs on the login screen",
                  "shows an error on launch", "cannot find my files", "closes by itself", "runs out of memory"]),
    "network": (["the VPN", "the Wi-Fi in meeting room {n}", "the wired network in building {letter}",
                 "the internet on level {n}", "the guest network", "the remote desktop gateway",
                 "the network in the {letter} wing", "the wireless in the canteen", "the Wi-Fi in building {letter}",
                 "the wireless on the {ordinal} floor", "the internet on the {ordinal} floor",
                 "the Wi-Fi near my desk"],
                ["is down", "drops all the time", "is very slow today", "will not connect",
                 "disconnects after a minute", "times out", "is unreachable since this morning",
                 "keeps disconnecting", "cuts out every few minutes", "keeps losing the signal"]),
    "access": (["I cannot open the {team_name} folder", "I need access to the {team_name} site",
                "no permission for the {team_name} report", "I am locked out of the {team_name} portal",
                "my badge does not open the {team_name} room"], [""]),
    "email": (["my inbox", "the team mailbox", "my mail rules", "the shared calendar", "my email signature",
               "mail to the {team_name} list"],
              ["is not updating", "lost all messages", "rejects new mail", "is empty since this morning",
               "does not sync", "sends duplicates"]),
    "other": (["need a new chair for my desk", "need a spare charger", "need a visitor badge for tomorrow",
               "the whiteboard in room {n} is gone", "need a phone for a new hire", "want a bigger screen"], [""]),
}
MADE_UP_TEAM_NAMES = ["marketing", "legal", "budget", "training", "design", "payroll", "inventory", "partner",
                      "research", "quality"]
MADE_UP_REASONS = (["the sales team", "our manager", "the client", "the whole office", "my colleague",
                    "the night shift", "our director"],
                   ["is waiting on this", "cannot work", "needs it by Friday", "has asked twice",
                    "is blocked since Monday", "keeps calling about it", "lost a day already"])
# More openers and closers for training; the held-out ones ("Morning, ", "Greetings, " ...) stay unseen.
TRAIN_ONLY_OPENERS = ["Good afternoon, ", "Dear IT, ", "Hi all, ", "Sorry to bother, ", "Hello support, ",
                      "Quick one: ", "Hey folks, ", "Evening, "]
TRAIN_ONLY_CLOSERS = [" Thanks so much.", " Regards.", " Best.", " Thank you!", " Appreciate it.",
                      " Kind regards.", " Thx!", " Cheers, thanks."]


def made_up_problem(category: str, r: random.Random, products: list[str]) -> str:
    things, symptoms = MADE_UP_PROBLEMS[category]
    return _fill(f"{r.choice(things)} {r.choice(symptoms)}".strip(), r, products)


def _fill(text: str, r: random.Random, products: list[str]) -> str:
    """The slots of an invented problem or thing: room, floor and building numbers, a product, a team."""
    return text.format(n=r.randint(1, 12), ordinal=_ordinal(r.randint(1, 12)), letter=r.choice("ABCDEFGH"),
                       product=r.choice(products), team_name=r.choice(MADE_UP_TEAM_NAMES))


def _capitalised(text: str) -> str:
    """The first character upper-cased and the rest kept (str.capitalize would lower "VPN" and ids)."""
    return text[:1].upper() + text[1:]


def _ordinal(n: int) -> str:
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n if n < 20 else n % 10, 'th')}"


def made_up_reason(r: random.Random) -> str:
    subjects, predicates = MADE_UP_REASONS
    return f"{r.choice(subjects)} {r.choice(predicates)}"


def _made_up_name(r: random.Random) -> str:
    """A capitalised 2-3 syllable word that is not one of the real names or domains of either split."""
    while True:
        word = "".join(r.choice(SYLLABLES) for _ in range(r.randint(2, 3))).capitalize()
        if word not in _REAL_WORDS:
            return word


_REAL_WORDS = set(FIRST_NAMES) | set(LAST_NAMES) | {d.split(".")[0].capitalize() for d in DOMAINS}


def pool(items: list, split: str) -> list:
    """The split's share of a pool: first 75% train, the rest heldout."""
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    k = max(1, round(len(items) * (1 - HELDOUT_FRACTION)))
    return items[:k] if split == "train" else items[k:]


# --------------------------------------------------------------------------- user phrasings
# Per intent; each list is split like the entity pools, so held-out phrasings are unseen in training.

PHRASES = {
    "reset_email": ["I forgot my password, my email is {email}", "can you reset the password for {email}?",
                    "please reset my password. account: {email}", "password reset needed for {email}",
                    "my password expired and I can't log in, I'm {email}", "need a new password for {email}",
                    "{email} here, I can't remember my password", "reset password please, email {email}"],
    "reset_id": ["please reset the password for user {user_id}", "reset password for {user_id}",
                 "my user id is {user_id} and I forgot my password", "can you send a reset link to {user_id}?",
                 "{user_id} needs a password reset", "password reset for account {user_id} please",
                 "I'm {user_id}, my password stopped working", "new password for {user_id} please"],
    "unlock_email": ["my account is locked, email {email}", "I'm locked out after too many tries, I'm {email}",
                     "please unlock the account of {email}", "{email} is locked, can you unlock it?",
                     "too many failed sign-ins, now locked. my email: {email}", "unlock {email} please",
                     "can't sign in, it says account locked ({email})", "account locked for {email}"],
    "unlock_id": ["please unlock account {user_id}", "{user_id} is locked out", "unlock user {user_id}",
                  "my account {user_id} got locked after failed logins", "can you unlock {user_id}?",
                  "locked out again, id {user_id}", "I'm {user_id} and my account is locked",
                  "account {user_id} locked, please help"],
    "lookup": ["what is the user id for {email}?", "look up the account for {email}",
               "can you find the employee with email {email}?", "who is {email}? I need the account id",
               "find account {email}", "which user id belongs to {email}?", "is {email} an active account?",
               "check the account of {email} please"],
    "status": ["what's the status of {ticket_id}?", "any update on ticket {ticket_id}?",
               "can you check {ticket_id} for me?", "status of {ticket_id} please",
               "is {ticket_id} fixed yet?", "where are we with {ticket_id}?", "I opened {ticket_id}, any news?",
               "has anyone looked at {ticket_id}?"],
    "escalate": ["please escalate {ticket_id} to the {team} team, {reason}",
                 "escalate {ticket_id} to {team} because {reason}",
                 "{ticket_id} needs the {team} team: {reason}", "can you send {ticket_id} to {team}? {reason}",
                 "move {ticket_id} to the {team} team, {reason}", "{reason}, so escalate {ticket_id} to {team}",
                 "I want {ticket_id} escalated to {team} since {reason}",
                 "hand {ticket_id} over to the {team} team: {reason}"],
    "create": ["problem: {title}, {urgency}", "{title}. {urgency}", "please open a ticket: {title}, {urgency}",
               "hello IT: {title}; {urgency}", "can you log a ticket? {title}. {urgency}",
               "{urgency}: {title}", "new issue: {title} ({urgency})", "I need help, {title}. {urgency}"],
    "kb": ["how do I {topic}?", "is there a guide to {topic}?", "search the knowledge base for how to {topic}",
           "any articles on how to {topic}?", "I need instructions to {topic}", "how can I {topic}?",
           "where can I read how to {topic}?", "help me {topic}"],
    "kb_n": ["show me {n} articles on how to {topic}", "find {n} guides to {topic}",
             "give me the top {n} results for how to {topic}", "list {n} how-tos: {topic}",
             "I'd like {n} articles about how to {topic}", "{n} kb articles on how to {topic} please",
             "search {n} articles to {topic}", "up to {n} results on how to {topic}"],
    "reset_bare": ["I forgot my password", "can you reset my password?", "my password doesn't work anymore",
                   "need a password reset", "password expired, help", "I can't remember my password",
                   "reset my password please", "my login password is wrong and I need a new one"],
    "unlock_bare": ["my account is locked", "I'm locked out", "please unlock my account",
                    "too many wrong passwords, now I'm locked", "account locked, help",
                    "it says my account is locked", "can you unlock me?", "locked out of my laptop login"],
    "status_bare": ["what's the status of my ticket?", "any update on my ticket?", "is my ticket fixed?",
                    "can you check my ticket?", "where is my support request?", "has my ticket moved?",
                    "I opened a ticket last week, any news?", "status of my request please"],
    "escalate_bare": ["please escalate my ticket", "can you escalate this?", "I want my ticket escalated",
                      "escalate it please", "my ticket needs to go higher", "this needs escalation",
                      "push my ticket to another team", "can someone senior take my ticket?"],
    "give_email": ["it's {email}", "{email}", "my email is {email}", "sure, {email}", "{email} is my address",
                   "use {email}", "the account is {email}", "email: {email}"],
    "give_ticket": ["it's {ticket_id}", "{ticket_id}", "the ticket is {ticket_id}", "sure: {ticket_id}",
                    "ticket id {ticket_id}", "it should be {ticket_id}", "{ticket_id} I think",
                    "number {ticket_id}"],
    "thanks": ["thanks, that worked!", "great, thank you", "perfect, thanks a lot", "that fixed it, cheers",
               "awesome, appreciated", "ok thanks", "thank you, all good now", "brilliant, thanks"],
    "greeting": ["hello", "hi there", "good morning", "hey", "hi, anyone there?", "hello helpdesk",
                 "good afternoon", "yo"],
    "capabilities": ["what can you do?", "what can you help me with?", "which things can you handle?",
                     "what are you able to do for me?", "how can you help?", "what kind of requests do you take?",
                     "what do you support?", "list what you can do"],
    "offtopic": ["what's the weather tomorrow?", "can you book me a flight?", "tell me a joke",
                 "what should I cook tonight?", "who won the game last night?", "write my essay",
                 "what's a good movie?", "order me a pizza"],
}
# Train-only paraphrases: more ways to ask for the same thing, so the model keys on the request and its slot
# values rather than on a few memorised sentences. Held-out pools above are untouched (a test checks that
# none of these appears in them).
TRAIN_ONLY_PHRASES = {
    "reset_email": ["{email}: password reset please", "I need to reset the password of {email}",
                    "could you send a password reset to {email}?", "password for {email} is not working, reset it",
                    "locked out of my mail because I forgot the password ({email})",
                    "forgot pw, account {email}", "reset the password on {email} for me",
                    "my email is {email}, please give me a new password"],
    "reset_id": ["user {user_id}: password reset please", "{user_id} forgot the password",
                 "could you reset {user_id}'s password?", "password for {user_id} expired",
                 "send a password reset link for {user_id}", "reset pw for {user_id}",
                 "id {user_id}, I need a fresh password", "forgot my password, user id {user_id}"],
    "unlock_email": ["{email} got locked, please unlock", "could you unlock my account? it's {email}",
                     "locked out, my address is {email}", "unlock the account for {email}",
                     "the account {email} is locked after wrong passwords", "my login {email} is blocked, unlock it",
                     "{email}: account locked", "I typed the wrong password too often, {email} is locked now"],
    "unlock_id": ["user {user_id} is locked", "could you unlock user id {user_id}?", "{user_id}: account locked",
                  "unlock account id {user_id}", "{user_id} got locked after wrong passwords",
                  "please remove the lock on {user_id}", "my id is {user_id}, I'm locked out",
                  "unlock {user_id} please, too many tries"],
    "lookup": ["find the user id of {email}", "do we have an account for {email}?", "look up {email}",
               "what account does {email} have?", "search the directory for {email}",
               "get me the account details for {email}", "which account is {email}?",
               "I need the user id behind {email}"],
    "status": ["how is {ticket_id} going?", "check ticket {ticket_id}", "status update for {ticket_id}?",
               "{ticket_id}: what's the status?", "is there news on {ticket_id}?", "look up ticket {ticket_id}",
               "what happened with {ticket_id}?", "could you tell me the status of {ticket_id}?"],
    "escalate": ["{ticket_id} should go to the {team} team because {reason}",
                 "escalate ticket {ticket_id} to {team}: {reason}",
                 "please pass {ticket_id} to the {team} team as {reason}",
                 "could you escalate {ticket_id} to {team}? {reason}",
                 "{ticket_id} needs escalation to {team}, {reason}",
                 "send {ticket_id} to the {team} team please, {reason}",
                 # the ticket named first and then called "it"
                 "{ticket_id}: {reason}. please escalate it to {team}",
                 "about {ticket_id}, {reason}. can you escalate it to the {team} team?",
                 "{ticket_id} again, {reason}. escalate it to {team} please"],
    "create": ["ticket please: {title}. {urgency}", "{title}, {urgency}", "reporting a problem: {title}. {urgency}",
               "could you open a ticket? {title}, {urgency}", "{title} ({urgency})",
               "issue to report: {title}; {urgency}", "{urgency}. {title}", "my problem: {title}. {urgency}",
               "{title}. can someone look at it? {urgency}", "hi, {title}. could somebody check it? {urgency}"],
    "kb": ["how to {topic}?", "what are the steps to {topic}?", "do you have a how-to to {topic}?",
           "explain how to {topic}", "look in the knowledge base: how to {topic}", "I want to {topic}, how?",
           "is there an article on how to {topic}?", "instructions to {topic} please",
           "can you show me how to {topic}?", "what's the procedure to {topic}?", "walk me through how to {topic}",
           "I'd like to {topic}. is there a guide?", "how would one {topic}?", "need a guide: {topic}",
           # A how-to asked as a plea for help is still a how-to: with "help" only in training problem reports
           # ("{title}. Please help."), runs/demo25 sent held-out "help me {topic}" questions to create_ticket or
           # asked back (7 of its 9 misrouted tool prompts). These say "help" before a verb; the held-out
           # pool's own "help me {topic}" stays unseen.
           "I need help to {topic}", "can you assist me to {topic}?", "any help on how to {topic}?",
           "I need some help to {topic}, is there a guide?", "could you help with how to {topic}?",
           "I don't know how to {topic}", "I'm trying to {topic}, any guide?", "stuck trying to {topic}, how?",
           "could you give me a hand to {topic}?", "I could use some help to {topic}"],
    "kb_n": ["{n} articles on how to {topic} please", "find me {n} how-tos to {topic}",
             "I need {n} guides on how to {topic}", "top {n} articles: how to {topic}",
             "show {n} results for how to {topic}", "give me {n} kb articles to {topic}",
             "look for {n} articles to {topic}", "pull up {n} guides to {topic}", "fetch {n} how-tos to {topic}",
             "I need help to {topic}, send {n} articles", "dig up {n} kb articles to {topic}"],
    "reset_bare": ["my password is not working", "I need a new password", "forgot my password again",
                   "please reset my password", "password reset please", "can I get a password reset?"],
    "unlock_bare": ["I am locked out of my account", "unlock my account please", "my login is locked",
                    "account is blocked after wrong passwords", "could you unlock my account?", "locked out again"],
    "status_bare": ["how is my ticket going?", "any news on my request?", "what's happening with my ticket?",
                    "check on my ticket please", "is my support ticket done?", "status update on my ticket?"],
    "escalate_bare": ["escalate my ticket please", "could you escalate my request?", "my ticket needs escalation",
                      "please push my ticket up", "I need this escalated", "send my ticket to someone senior"],
    "give_email": ["{email} please", "it is {email}", "here you go: {email}", "account {email}",
                   "my address is {email}", "that's {email}"],
    "give_ticket": ["{ticket_id} please", "it is {ticket_id}", "here: {ticket_id}", "ticket {ticket_id}",
                    "the id is {ticket_id}", "that's {ticket_id}"],
    # Requests that take no tool. With six training phrasings each, an unseen one ("what's a good movie?")
    # read as a new problem and opened a ticket; many more, and as varied, teach what is not a ticket. The
    # off-topic ones are plainly not IT: with "plan my vacation" or "what's the best phone to buy?" among them
    # the model turned away how-to questions ("help me set up email on my phone") too (README, demo9).
    "offtopic": ["can you recommend a restaurant nearby?", "what time is it in Tokyo?",
                 "what's the capital of Australia?", "translate this sentence into French",
                 "can you call a taxi for me?", "who is the best football player ever?", "recommend a novel",
                 "what's on TV tonight?", "give me a recipe for pancakes", "what are this week's lottery numbers?",
                 "sing me a song", "what's the stock price of Acme today?", "write a poem about cats",
                 "is it going to rain this weekend?", "who wrote Hamlet?", "where should I go on holiday?"],
    "greeting": ["hi!", "hello, are you there?", "hey there", "good evening", "hi IT", "morning!"],
    "thanks": ["thanks so much", "that did it, thank you", "cool, thanks", "many thanks, it works now",
               "great, cheers", "thank you very much"],
    "capabilities": ["what are you for?", "what tasks can you do?", "what can I ask you?",
                     "what services do you offer?", "can you tell me what you do?", "what are your features?"],
    "reset_bare": ["I need my password reset", "password doesn't work, please reset it",
                   "forgot the password for my account", "can you give me a new password?"],
    "unlock_bare": ["my account got locked", "I can't get in, it says locked", "locked account, please unlock",
                    "I'm blocked from signing in"],
    "status_bare": ["did anyone look at my ticket?", "what's up with my request?", "any progress on my case?",
                    "is there an update on my issue?"],
    "escalate_bare": ["please escalate this ticket", "I need my request escalated",
                      "can this go to a higher level?", "raise my ticket please"],
}

OPENERS = ["", "", "Hi, ", "Hello, ", "Hey, ", "Good morning, ", "Hi team, ", "Hello there, ", "Hey IT, ",
           "Morning, ", "Greetings, ", "Hiya, "]
CLOSERS = ["", "", " Thanks!", " Thank you.", " Cheers.", " thx", " Thanks a lot.", " Much appreciated.",
           " ty", " Thanks in advance.", " Many thanks.", " Cheers!"]

# --------------------------------------------------------------------------- assistant texts
ANSWERS = {
    "thanks": "You're welcome! Let me know if anything else comes up.",
    "greeting": "Hello! How can I help you with IT today?",
    "capabilities": ("I can look up accounts, reset passwords, unlock accounts, open tickets, check ticket "
                     "status, escalate tickets and search the knowledge base."),
    "offtopic": "Sorry, I can only help with IT support requests.",
}
QUESTIONS = {
    "reset_bare": "Sure. What is the work email of the account?",
    "unlock_bare": "I can unlock it. What is the work email of the account?",
    "status_bare": "Which ticket is it? Please send the ticket id, like INC-1234.",
    "escalate_bare": "Which ticket should I escalate? Please send the ticket id, like INC-1234.",
}
SYSTEM_PROMPTS = ["You are the IT helpdesk assistant at {company}. Use the tools to help employees.",
                  "You are {company}'s IT support agent. Be brief and use tools when needed.",
                  "You help {company} employees with IT problems. Call tools for account and ticket actions."]


# --------------------------------------------------------------------------- generation

class _Gen:
    """Draws one example from a split's pools with its own random stream."""

    def __init__(self, split: str, rng: random.Random, tools: list[dict], shapes: random.Random,
                 history: random.Random):
        self.split, self.rng, self.all_tools = split, rng, tools
        # Tool-result shapes are drawn from their own stream, so that adding them left every example's
        # entities and wording (and so the held-out prompts) as they were.
        self.shapes = shapes
        # Whether a training conversation starts with earlier requests: a stream of its own too.
        self.history = history
        self.first, self.last = pool(FIRST_NAMES, split), pool(LAST_NAMES, split)
        self.domains, self.products = pool(DOMAINS, split), pool(PRODUCTS, split)
        self.errors, self.topics, self.reasons = pool(ERRORS, split), pool(KB_TOPICS, split), pool(REASONS, split)
        self.companies = pool(COMPANIES, split)
        self.issues = {c: pool(v, split) for c, v in ISSUES.items()}

    # ---- entities
    def person(self) -> dict:
        r = self.rng
        first, last, domain = r.choice(self.first), r.choice(self.last), r.choice(self.domains)
        if self.split == "train" and r.random() < MADE_UP_RATE:
            first, last = _made_up_name(r), _made_up_name(r)
            domain = f"{_made_up_name(r).lower()}.{r.choice(MADE_UP_TLDS)}"
        local = r.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}", f"{first}{last[0]}"]).lower()
        return {"name": f"{first} {last}", "email": f"{local}@{domain}", "user_id": f"U{r.randint(10000, 99999)}"}

    def topic(self) -> str:
        r = self.rng
        if self.split == "train" and r.random() < MADE_UP_RATE:
            # Half the invented topics are about the things problem reports are about ("sync my inbox",
            # "configure the Wi-Fi in meeting room 3"): held-out how-tos share words with problems ("set up
            # email on my phone"), and a model that tells the two apart by their objects instead of by the
            # request sends those to create_ticket (runs/demo22: all 18 held-out how-tos of demo_eval).
            while True:
                verb = r.choice(KB_VERBS)
                if r.random() < 0.5:
                    return f"{verb} {r.choice(KB_OBJECTS)}"
                thing = self.made_up_thing()
                if not (verb == "set up" and "VPN" in thing):  # keep examples/ticket_agent.py's how-to unseen
                    return f"{verb} {thing}"
        return r.choice(self.topics)

    def made_up_thing(self) -> str:
        """An invented thing a problem is about ("the printer on the 3rd floor"), of any category but access."""
        r = self.rng
        category = r.choice(["hardware", "software", "network", "email"])
        return _fill(r.choice(MADE_UP_PROBLEMS[category][0]), r, self.products)

    def ticket_id(self) -> str:
        return f"INC-{self.rng.randint(1000, 9999)}"

    def call_id(self) -> str:
        return "call_" + "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))

    # ---- text
    def user_text(self, intent: str, **slots) -> str:
        """A phrasing of `intent` from the split's pool, with typos, casing and politeness varied on the
        template text only, so the slot values (ids, emails, titles) stay exact."""
        r = self.rng
        phrases = pool(PHRASES[intent], self.split)
        if self.split == "train":
            phrases = phrases + TRAIN_ONLY_PHRASES.get(intent, [])
        text = r.choice(phrases)
        if self.split == "train" and r.random() < SYNONYM_RATE:
            text = _swap_synonyms(text, r)
        if r.random() < 0.15:
            text = _typo(text, r)
        if r.random() < 0.1:
            text = text.lower()
        if intent not in ("give_email", "give_ticket", "greeting", "thanks"):
            openers, closers = pool(OPENERS, self.split), pool(CLOSERS, self.split)
            if self.split == "train":
                openers, closers = openers + TRAIN_ONLY_OPENERS, closers + TRAIN_ONLY_CLOSERS
            opener, closer = r.choice(openers), r.choice(closers)
            if opener and not text.startswith(("{", "I ", "I'")):
                text = text[0].lower() + text[1:]
            text = opener + text + closer
        if self.split == "train" and r.random() < CAPITALISED_RATE:
            text = _capitalised(text)
        return text.format(**slots)

    def tool_call(self, name: str, arguments: dict) -> dict:
        return {"id": self.call_id(), "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)}}


# Train-only word swaps: the same requests in other words, so that a request is recognised by its meaning
# rather than by the exact words of the training phrasings.
SYNONYM_RATE = 0.3
SYNONYMS = {"password": ["passcode", "pw", "login password"], "locked": ["blocked", "frozen"],
            "ticket": ["case", "request", "incident"], "reset": ["renew", "change"],
            "account": ["login", "user account"], "please": ["pls", "kindly"], "help": ["assist", "support"],
            "articles": ["docs", "guides"], "escalate": ["raise", "bump"], "status": ["progress", "state"],
            "unlock": ["unblock", "release"], "can you": ["could you", "would you"],
            "how do I": ["how would I", "what's the way to"], "need": ["want", "require"]}


def _swap_synonyms(text: str, r: random.Random) -> str:
    for word, alternatives in SYNONYMS.items():
        if r.random() < 0.5:
            text = re.sub(rf"\b{re.escape(word)}\b", lambda m: r.choice(alternatives), text)
    return text


def _typo(text: str, r: random.Random) -> str:
    """Swap two adjacent letters in one plain word (never inside a {slot})."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = r.choice(candidates)
    w = words[i]
    j = r.randrange(len(w) - 1)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


# Reasoning per decision: (normal, low effort). Filled with the same slots as the action.
THINK = {
    "lookup_user": ("The user gave the email {email} but no user id. I'll call lookup_user to find the account first.",
                    "Look up {email}."),
    # The first step of a chain names the second: the next turn still sees this thought (the template keeps the
    # reasoning of the turns after the last user message), so the call after the lookup has its plan in view.
    "lookup_then_reset": ("The user gave the email {email} but no user id. I'll call lookup_user first, then "
                          "reset_password with the user id it returns.", "Look up {email}, then reset."),
    "lookup_then_unlock": ("The user gave the email {email} but no user id. I'll call lookup_user first, then "
                           "unlock_account with the user id it returns.", "Look up {email}, then unlock."),
    "reset_password": ("The account id is {user_id}. I'll call reset_password to send a reset link.",
                       "Reset {user_id}."),
    "unlock_account": ("The account {user_id} is locked. I'll call unlock_account.", "Unlock {user_id}."),
    "get_ticket_status": ("The user asks about ticket {ticket_id}. I'll call get_ticket_status.",
                          "Check {ticket_id}."),
    "escalate_ticket": ("The user wants {ticket_id} escalated to the {team} team. I'll call escalate_ticket with their reason.",
                        "Escalate {ticket_id} to {team}."),
    "create_ticket": ("This is a new {category} problem with priority {priority}. I'll call create_ticket.",
                      "New {category} ticket, priority {priority}."),
    "search_kb": ("This is a how-to question. I'll call search_kb for \"{query}\".", "Search the KB."),
    "answer": ("{why} I can answer directly without a tool.", "Answer directly."),
    "question": ("{why} I need to ask before calling a tool.", "Ask for details."),
    "final": ("The tool result is back. I'll summarise it for the user.", "Summarise the result."),
}
WHY_ANSWER = {"thanks": "The user is thanking me.", "greeting": "The user is greeting me.",
              "capabilities": "The user asks what I can do.", "offtopic": "This request is not about IT."}
WHY_QUESTION = {"reset_bare": "The user wants a password reset but gave no email or user id.",
                "unlock_bare": "The user is locked out but gave no email or user id.",
                "status_bare": "The user asks about a ticket but gave no ticket id.",
                "escalate_bare": "The user wants an escalation but gave no ticket id."}

# Which requests each tool-using turn type draws: a chain (lookup, then reset/unlock) is only cut
# after its first call where that call is itself the right next action.
_ONE_STEP = ["lookup", "reset_id", "unlock_id", "status", "escalate", "create", "kb", "kb_n"]
TASK_KINDS = {"single_tool": _ONE_STEP + ["reset_email", "unlock_email"], "tool_answer": _ONE_STEP,
              "two_tool": ["reset_email", "unlock_email"], "two_tool_answer": ["reset_email", "unlock_email"]}
TURN_WEIGHTS = {"single_tool": 30, "two_tool": 12, "tool_answer": 14, "two_tool_answer": 8,
                "direct_answer": 10, "clarify": 14, "clarify_then_tool": 12}
# A share of the training conversations first resolve one or two earlier requests (call, result, answer).
# The template drops the reasoning of turns before the last user message, so those turns are what the model
# writes with thinking off, and they are targets too: a prompt of 300-650 tokens, mostly the tool list, then
# carries two or three decisions instead of one. The last request keeps the held-out mix of turn types, so no
# request becomes rarer (runs/demo20-21 re-weighted the mix instead and lost the rarer requests).
HISTORY_RATE = 0.5


class _Conversation:
    """Builds the message list and assistant turns in the example's thinking mode."""

    def __init__(self, g: _Gen, mode: str):
        self.g, self.mode = g, mode
        company = g.rng.choice(g.companies)
        self.messages: list[dict] = [{"role": "system", "content": g.rng.choice(SYSTEM_PROMPTS).format(company=company)}]
        self.needed: list[str] = []

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def assistant(self, think_key: str, content: str = "", call: tuple[str, dict] | None = None, **slots) -> dict:
        msg: dict = {"role": "assistant", "content": content}
        if self.mode != "off":
            normal, low = THINK[think_key]
            msg["reasoning_content"] = (low if self.mode == "low" else normal).format(**slots)
        if call is not None:
            name, arguments = call
            msg["tool_calls"] = [self.g.tool_call(name, arguments)]
            self.needed.append(name)
        self.messages.append(msg)
        return msg

    def call(self, name: str, arguments: dict, think_key: str | None = None, **extra) -> dict:
        return self.assistant(think_key or name, call=(name, arguments), **{**arguments, **extra})

    def tool_result(self, result: dict) -> None:
        last_call = self.messages[-1]["tool_calls"][-1]
        self.messages.append({"role": "tool", "tool_call_id": last_call["id"], "content": json.dumps(result)})


def _task(g: _Gen, c: _Conversation, kinds: list[str]) -> tuple[str, list]:
    """Pick a tool-needing request, add the user turn, and return (intent, steps): each step is
    (tool name, arguments, result-maker(arguments) -> (result, final answer))."""
    r = g.rng
    p = g.person()
    kind = r.choice(kinds)
    # Tool results come in two shapes each (a backend's own fields, or an ok / found flag with fewer fields), so
    # that the model reads the values it needs rather than one fixed layout.
    plain = g.shapes.random() < 0.5
    locked = kind == "unlock_email"
    lookup_result = ({"user_id": p["user_id"], "name": p["name"], "status": "locked" if locked else "active"} if plain
                     else {"found": True, "user_id": p["user_id"], "name": p["name"], "locked": locked})
    reset = lambda a: ({"status": "ok", "link_sent_to": p["email"] if "email" in kind else "registered email"}
                       if plain else {"ok": True, "message": "one-time link emailed"},
                       f"Done. A one-time password reset link was sent for {a['user_id']}.")
    unlock = lambda a: ({"user_id": a["user_id"], "status": "unlocked"} if plain else {"ok": True},
                        f"Account {a['user_id']} is unlocked. You can sign in again.")
    if kind in ("reset_email", "unlock_email", "lookup"):
        c.user(g.user_text(kind, email=p["email"]))
        status = "locked" if locked else "active"
        steps = [("lookup_user", {"email": p["email"]},
                  lambda a: (lookup_result, f"The account for {p['email']} is {p['user_id']} ({p['name']}), "
                                            f"status {status}."))]
        if kind != "lookup":
            second = "reset_password" if kind == "reset_email" else "unlock_account"
            steps.append((second, {"user_id": p["user_id"]}, reset if second == "reset_password" else unlock))
        return kind, steps
    if kind in ("reset_id", "unlock_id"):
        c.user(g.user_text(kind, user_id=p["user_id"]))
        name = "reset_password" if kind == "reset_id" else "unlock_account"
        return kind, [(name, {"user_id": p["user_id"]}, reset if kind == "reset_id" else unlock)]
    if kind == "status":
        tid = g.ticket_id()
        text = g.user_text(kind, ticket_id=tid)
        if g.split == "train" and r.random() < STATUS_CONTEXT_RATE:
            thing = g.made_up_thing()  # drawn before the sentence, as the shipped weights' corpus did
            text += " " + r.choice(STATUS_CONTEXT).format(thing=thing, when=r.choice(STATUS_CONTEXT_WHEN))
        c.user(text)
        status, team = r.choice(["open", "in progress", "waiting for user", "resolved"]), r.choice(TEAMS)
        category = g.shapes.choice(CATEGORIES)
        found = {"found": True, "ticket_id": tid, "title": g.shapes.choice(g.issues[category]).format(
            product=g.shapes.choice(g.products)), "status": status, "team": team}
        return kind, [("get_ticket_status", {"ticket_id": tid},
                       lambda a: ({"ticket_id": tid, "status": status, "assigned_team": team} if plain else found,
                                  f"Ticket {tid} is {status}, assigned to the {team} team."))]
    if kind == "escalate":
        tid, team, reason = g.ticket_id(), r.choice(TEAMS), r.choice(g.reasons)
        if g.split == "train" and r.random() < MADE_UP_RATE:
            reason = made_up_reason(r)
        c.user(g.user_text(kind, ticket_id=tid, team=team, reason=reason))
        return kind, [("escalate_ticket", {"ticket_id": tid, "team": team, "reason": reason},
                       lambda a: ({"ticket_id": tid, "team": team, "status": "escalated"} if plain else {"ok": True},
                                  f"Ticket {tid} is escalated to the {team} team."))]
    if kind == "create":
        category = r.choice(CATEGORIES)
        title = r.choice(g.issues[category]).format(product=r.choice(g.products))
        if g.split == "train" and r.random() < MADE_UP_RATE:
            title = made_up_problem(category, r, g.products)
        priority = r.randint(1, 4)
        urgency = r.choice(URGENCY[priority] + (TRAIN_ONLY_URGENCY[priority] if g.split == "train" else []))
        if g.split == "train" and r.random() < 0.3:
            urgency = _capitalised(urgency)
        if g.split == "train" and r.random() < 0.25:
            # People open with the problem, as a sentence with a capital ("The Wi-Fi on ..."), and end with
            # the urgency; the title is copied as written.
            title = _capitalised(title)
            text = r.choice(TITLE_FIRST_PHRASES).format(title=title, urgency=_capitalised(urgency))
        else:
            text = g.user_text(kind, title=title, urgency=urgency)
        if category in ("software", "network", "email") and r.random() < 0.4:
            text += f" It shows {r.choice(g.errors)}."
        c.user(text)
        new_id = g.ticket_id()
        # The call names category and priority first, in the order the reasoning just decided them: with the
        # title first, runs/demo27 reasoned "a new network problem" and then, after a misremembered title,
        # called category hardware for examples/ticket_agent.py's Wi-Fi outage.
        return kind, [("create_ticket", {"category": category, "priority": priority, "title": title},
                       lambda a: ({"ticket_id": new_id, "status": "open"} if plain
                                  else {"ok": True, "ticket_id": new_id},
                                  f"I opened ticket {new_id} ({a['category']}, priority {a['priority']}). "
                                  f"The team will contact you."))]
    topic = g.topic()
    args: dict = {"query": topic}
    if kind == "kb_n":
        args["max_results"] = r.randint(1, 5)
        c.user(g.user_text(kind, topic=topic, n=args["max_results"]))
    else:
        c.user(g.user_text(kind, topic=topic))
    kb_id = f"KB-{r.randint(100, 999)}"
    # Train-only article titles of other shapes: a knowledge base names its articles as it likes ("Set up the
    # VPN client"), and with every title "How to ..." runs/demo23 answered a search whose titles were not
    # with a made-up ticket. The answer names the article by its own title. Held-out results keep their shape.
    title_shape = g.shapes.choice(KB_TITLE_SHAPES) if g.split == "train" and g.shapes.random() < 0.5 else None
    kb_title = lambda t: _kb_title(t, title_shape)
    found_articles = [{"id": kb_id, "title": kb_title(topic)}]
    for _ in range(0 if plain else g.shapes.randint(0, 2)):  # the best match first, then weaker ones
        found_articles.append({"id": f"KB-{g.shapes.randint(100, 999)}",
                               "title": kb_title(g.shapes.choice(g.topics))})
    if g.split == "train" and g.shapes.random() < 0.5:
        for article in found_articles:
            article["body"] = g.shapes.choice(KB_BODIES)
    return kind, [("search_kb", args,
                   lambda a: ({"results": found_articles},
                              f"See {kb_id}: \"{found_articles[0]['title']}\" in the knowledge base."))]


KB_TITLE_SHAPES = ["{Topic}", "{Topic} (guide)", "Guide: {topic}", "{Topic} - step by step", "FAQ: how to {topic}",
                   "{Topic} on Windows and macOS"]


def _kb_title(topic: str, shape: str | None) -> str:
    if shape is None:
        return f"How to {topic}"
    return shape.format(topic=topic, Topic=_capitalised(topic))


def _example(g: _Gen, turn_type: str) -> Example:
    r = g.rng
    u = r.random()
    mode = "on" if u < 0.7 else ("low" if u < 0.85 else "off")
    c = _Conversation(g, mode)
    history = 0
    if g.split == "train" and g.history.random() < HISTORY_RATE:
        history = g.history.randint(1, 2)
    for _ in range(history):
        _, earlier = _task(g, c, TASK_KINDS["tool_answer"])
        name, arguments, make_result = earlier[0]
        c.call(name, arguments)
        result, final = make_result(arguments)
        c.tool_result(result)
        c.assistant("final", final)

    if turn_type == "direct_answer":
        intent = r.choice(list(ANSWERS))
        c.user(g.user_text(intent))
        c.assistant("answer", ANSWERS[intent], why=WHY_ANSWER[intent])
        expected = {"type": "no_tool", "kind": "answer"}
    elif turn_type in ("clarify", "clarify_then_tool"):
        intent = r.choice(list(QUESTIONS) if turn_type == "clarify" else ["reset_bare", "unlock_bare", "status_bare"])
        c.user(g.user_text(intent))
        c.assistant("question", QUESTIONS[intent], why=WHY_QUESTION[intent])
        expected = {"type": "no_tool", "kind": "question"}
        if turn_type == "clarify_then_tool":
            if intent == "status_bare":
                tid = g.ticket_id()
                c.user(g.user_text("give_ticket", ticket_id=tid))
                name, arguments = "get_ticket_status", {"ticket_id": tid}
            else:
                p = g.person()
                c.user(g.user_text("give_email", email=p["email"]))
                name, arguments = "lookup_user", {"email": p["email"]}
            c.call(name, arguments)
            expected = {"type": "tool_call", "name": name, "arguments": arguments}
    else:
        intent, steps = _task(g, c, TASK_KINDS[turn_type])
        n_calls = 1 if turn_type in ("single_tool", "tool_answer") else 2
        final = ""
        for name, arguments, make_result in steps[:n_calls]:
            plan = None
            if name == "lookup_user" and len(steps) == 2:
                plan = "lookup_then_reset" if steps[1][0] == "reset_password" else "lookup_then_unlock"
            c.call(name, arguments, think_key=plan)
            expected = {"type": "tool_call", "name": name, "arguments": arguments}
            result, final = make_result(arguments)
            if turn_type.endswith("answer") or (turn_type == "two_tool" and name == "lookup_user"):
                c.tool_result(result)
        if turn_type.endswith("answer"):
            c.assistant("final", final)
            expected = {"type": "no_tool", "kind": "answer"}

    tools = _tool_set(g, c.needed)
    kwargs = {"enable_thinking": mode != "off", "low_effort": mode == "low"}
    return Example(c.messages, tools, kwargs, expected, turn_type, intent, g.split, history)


def _tool_set(g: _Gen, needed: list[str]) -> list[dict]:
    """All tools in a random order; sometimes a random subset that keeps every tool the example uses."""
    r = g.rng
    tools = list(g.all_tools)
    r.shuffle(tools)
    if g.split == "train" and r.random() < 0.4:
        # shorter prompts for a share of the training set: the trainer sees more conversations per minute
        keep = set(needed) | {t["function"]["name"] for t in r.sample(tools, r.randint(0, 3))}
        tools = [t for t in tools if t["function"]["name"] in keep]
    elif r.random() < 0.25:
        keep = set(needed) | {t["function"]["name"] for t in r.sample(tools, r.randint(2, len(tools)))}
        tools = [t for t in tools if t["function"]["name"] in keep]
    return tools


def generate(split: str, n: int, seed: int) -> list[Example]:
    """`n` examples of `split` ("train" or "heldout"); the i-th example depends only on (split, seed, i)."""
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    tools = load_tools()
    names, weights = zip(*TURN_WEIGHTS.items())
    out = []
    for i in range(n):
        rng = random.Random(f"{split}:{seed}:{i}")
        g = _Gen(split, rng, tools, shapes=random.Random(f"{split}:{seed}:{i}:shapes"),
                 history=random.Random(f"{split}:{seed}:{i}:history"))
        out.append(_example(g, rng.choices(names, weights)[0]))
    return out


# --------------------------------------------------------------------------- rendering

def load_template(source: str | ChatTemplate | None = None) -> ChatTemplate:
    """`source` as a ChatTemplate: template text, an already built one, or None for the demo model's."""
    if isinstance(source, ChatTemplate):
        return source
    if source is None:
        return ChatTemplate.from_model_dir(MODEL_DIR)
    return ChatTemplate(source, special_tokens={"bos_token": "<s>", "eos_token": "<|im_end|>"})


def render_messages(messages: list[dict], tools: list[dict] | None, template_kwargs: dict,
                    template: str | ChatTemplate | None = None, add_generation_prompt: bool = False) -> str:
    # ChatTemplate decodes the OpenAI JSON-string arguments to objects, as the server does.
    return load_template(template).render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                          **template_kwargs)


def render(example: Example, template: str | ChatTemplate | None = None) -> str:
    """The whole conversation as training text, rendered with the Nemotron 3 chat template."""
    return render_messages(example.messages, example.tools, example.template_kwargs, template)


def prompt_text(example: Example, template: str | ChatTemplate | None = None) -> str:
    """The evaluation prompt: everything before the last assistant turn, plus the generation prompt."""
    return render_messages(example.messages[:-1], example.tools, example.template_kwargs, template,
                           add_generation_prompt=True)


def training_segments(example: Example, template: str | ChatTemplate | None = None) -> list[tuple[str, bool]]:
    """Split `render(example)` into (text, is_target) pieces whose concatenation is the rendered text.

    Targets are the assistant turns after the last user message, each from the end of the generation
    prompt (`<|im_start|>assistant\\n<think>\\n` or `...<think></think>`) through `<|im_end|>`. Earlier turns
    have their reasoning dropped by the template; they are context, except in an example with `history`
    (earlier requests), where they are targets after their `<think></think>`, as the model writes them with
    thinking off.
    """
    template = load_template(template)
    text = render(example, template)
    probe = [{"role": "user", "content": "x"}]
    gen_prompt = render_messages(probe, None, example.template_kwargs, template, add_generation_prompt=True)
    gen_prompt = gen_prompt[len(render_messages(probe, None, example.template_kwargs, template)):]
    header = "<|im_start|>assistant\n"

    last_user = max(i for i, m in enumerate(example.messages) if m["role"] == "user")
    assistant_idx = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    segments: list[tuple[str, bool]] = []
    pos = search = 0
    for i in assistant_idx:
        start = text.index(header, search)
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        search = end
        if i < last_user:
            if not example.history:
                continue
            target_start = start + len(header)
            if text.startswith("<think></think>", target_start):
                target_start += len("<think></think>")
        else:
            target_start = start + len(gen_prompt) if text.startswith(gen_prompt, start) else start + len(header)
        segments.append((text[pos:target_start], False))
        segments.append((text[target_start:end], True))
        pos = end
    segments.append((text[pos:], False))
    return [(s, t) for s, t in segments if s]


def write_jsonl(path: str | Path, examples: list[Example], template: str | ChatTemplate | None = None,
                with_segments: bool = False) -> None:
    """One example per line (`Example.to_dict()`), plus its `segments` when asked."""
    compiled = load_template(template) if with_segments else None
    with open(path, "w") as f:
        for ex in examples:
            d = ex.to_dict()
            if with_segments:
                d["segments"] = training_segments(ex, compiled)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Example]:
    with open(path) as f:
        return [Example.from_dict(json.loads(line)) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the nemoh demo IT-helpdesk corpus.")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--render", action="store_true", help="add rendered (text, is_target) segments")
    args = parser.parse_args(argv)
    examples = generate(args.split, args.n, args.seed)
    write_jsonl(args.out, examples, with_segments=args.render)
    print(f"wrote {len(examples)} {args.split} examples to {args.out}")


if __name__ == "__main__":
    main()
