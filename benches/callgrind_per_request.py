#!/usr/bin/env python3
"""Instructions per request from a callgrind dump of a sidecar (benches/callgrind.sh).

Requests are counted as the calls of telemetry's Observation::finish, which every proxied
request goes through once. Prints the total per request, then the functions with the most
instructions of their own (`--top N`, default 25).
"""
import collections
import re
import sys

PER_REQUEST = re.compile(r"telemetry::Observation::finish$")


def parse(path):
    names, own, calls = {}, collections.Counter(), collections.Counter()
    fn = cfn = None
    after_calls = False

    def name(tok):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", tok)
        if not m:
            return tok
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), m.group(1))

    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                fn = name(line[3:])
            elif line.startswith("cfn="):
                cfn = name(line[4:])
            elif line.startswith("calls="):
                calls[cfn] += int(line[6:].split()[0])
                after_calls = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2:
                    # The line after calls= is the call's inclusive cost, not the caller's own.
                    if not after_calls:
                        own[fn] += int(parts[1])
                    after_calls = False
    return own, calls


def main():
    args = sys.argv[1:]
    top = 25
    if "--top" in args:
        i = args.index("--top")
        top = int(args[i + 1])
        del args[i : i + 2]
    own, calls = parse(args[0])
    requests = sum(c for f, c in calls.items() if PER_REQUEST.search(f))
    if requests == 0:
        sys.exit("no request finished in the dump")
    total = sum(own.values())
    print(f"{requests} requests, {total / requests:,.0f} instructions per request")
    for f, c in own.most_common(top):
        print(f"{100 * c / total:5.1f}%  {c / requests:8,.0f}  {f[:140]}")


main()
