//! Robustness: no input makes the parser, the formatter or the renderer panic or
//! overflow the stack, and every error renders with a `file:line:column` location.
//!
//! Three sources of input:
//!
//! * the corpus in `tests/malformed/` (binary garbage, bad encodings, unclosed
//!   everything), whose outcomes are pinned as snapshots;
//! * generated stress inputs: 200 000 nested parentheses, 100 000-term operator chains,
//!   100 000 prefix or postfix operators, deep `if` and call nesting;
//! * 1 000 random byte strings from a deterministic xorshift generator, biased towards
//!   the language's own tokens, and 300 random well-formed files whose spans must cover
//!   their nodes exactly and whose formatting must round-trip.

mod common;

use std::path::{Path, PathBuf};

use grammar::ast::File;
use grammar::diagnostic::codes;
use grammar::dump::dump_file;
use grammar::format::strip_spans;
use grammar::parser::{parse_bytes, MAX_DEPTH};
use grammar::{format_file, parse, render, Diagnostic};

/// Whether `text` contains `--> {file}:LINE:COLUMN`.
fn has_location(text: &str, file: &str) -> bool {
    let marker = format!("--> {file}:");
    text.match_indices(&marker).any(|(at, _)| {
        let rest = &text[at + marker.len()..];
        let mut parts = rest.splitn(3, ':');
        let line = parts.next().unwrap_or("");
        let column: String = parts.next().unwrap_or("").chars().take_while(char::is_ascii_digit).collect();
        !line.is_empty() && line.chars().all(|c| c.is_ascii_digit()) && !column.is_empty()
    })
}

/// Renders each diagnostic on its own and checks that it shows where it is.
fn check_rendering(name: &str, diagnostics: &[Diagnostic], source: &str) -> String {
    assert!(!diagnostics.is_empty(), "{name}: Err without diagnostics");
    for diagnostic in diagnostics {
        let text = render(std::slice::from_ref(diagnostic), "input.metric", source, false);
        assert!(has_location(&text, "input.metric"), "{name}: no location in\n{text}");
    }
    render(diagnostics, "input.metric", source, false)
}

/// Parses `source`; on success checks the format round trip, on failure the rendering.
fn check(name: &str, bytes: &[u8]) -> Result<File, Vec<Diagnostic>> {
    let result = parse_bytes(bytes);
    match &result {
        Ok(file) => check_round_trip(name, file),
        Err(diagnostics) => {
            check_rendering(name, diagnostics, &String::from_utf8_lossy(bytes));
        }
    }
    result
}

fn check_round_trip(name: &str, file: &File) {
    let formatted = format_file(file);
    let reparsed = match parse(&formatted) {
        Ok(reparsed) => reparsed,
        Err(diagnostics) => panic!(
            "{name}: formatted text does not parse:\n{formatted}\n{}",
            render(&diagnostics, "formatted.metric", &formatted, false)
        ),
    };
    assert_eq!(strip_spans(&reparsed), strip_spans(file), "{name}: formatting changed the tree:\n{formatted}");
    assert_eq!(format_file(&reparsed), formatted, "{name}: formatting is not idempotent");
}

/// Control characters would make snapshots unreadable (and some are not valid in them).
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\n' { c.escape_unicode().to_string() } else { c.to_string() })
        .collect()
}

#[path = "../../tests/common/files.rs"]
mod files;

fn corpus_files() -> Vec<PathBuf> {
    let files = files::metric_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed"));
    assert!(files.len() >= 15, "the corpus shrank to {} files", files.len());
    files
}

#[test]
fn corpus_files_fail_gracefully() {
    for path in corpus_files() {
        let name = path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let outcome = match check(&name, &bytes) {
            Ok(file) => format!("parsed\n{}", dump_file(&file)),
            Err(diagnostics) => render(&diagnostics, "input.metric", &String::from_utf8_lossy(&bytes), false),
        };
        insta::assert_snapshot!(format!("corpus_{name}"), printable(&outcome));
    }
}

/// One generated stress input and the diagnostic code it must produce (`None`: parses).
struct Stress {
    name: &'static str,
    source: String,
    expect: Option<&'static str>,
}

fn in_metric(expression: &str) -> String {
    format!("metric m {{\n    {expression}\n}}\n")
}

fn stress_inputs() -> Vec<Stress> {
    const N: usize = 100_000;
    let deep = MAX_DEPTH - 1;
    vec![
        Stress { name: "200k open parens at top level", source: "(".repeat(200_000), expect: Some(codes::SYNTAX) },
        Stress {
            name: "200k open parens in a body",
            source: in_metric(&"(".repeat(200_000)),
            expect: Some(codes::TOO_DEEP),
        },
        Stress {
            name: "200k balanced parens",
            source: in_metric(&format!("{}x{}", "(".repeat(200_000), ")".repeat(200_000))),
            expect: Some(codes::TOO_DEEP),
        },
        Stress {
            name: "100k-term + chain",
            source: in_metric(&format!("{}a", "a + ".repeat(N))),
            expect: Some(codes::TOO_DEEP),
        },
        Stress {
            name: "100k-term mixed chain",
            source: in_metric(&format!("{}a", "a * b + c & ".repeat(N / 3))),
            expect: Some(codes::TOO_DEEP),
        },
        Stress { name: "100k !", source: in_metric(&format!("{}x", "!".repeat(N))), expect: Some(codes::TOO_DEEP) },
        Stress { name: "100k -", source: in_metric(&format!("{}x", "-".repeat(N))), expect: Some(codes::TOO_DEEP) },
        Stress {
            name: "100k slices",
            source: in_metric(&format!("x{}", "[1:]".repeat(N))),
            expect: Some(codes::TOO_DEEP),
        },
        Stress {
            name: "100k annotations",
            source: in_metric(&format!("x{}", "@a".repeat(N))),
            expect: Some(codes::TOO_DEEP),
        },
        Stress { name: "100k nested calls", source: in_metric(&"f(".repeat(N)), expect: Some(codes::TOO_DEEP) },
        Stress {
            name: "100k open brackets",
            source: in_metric(&format!("x{}", "[".repeat(N))),
            expect: Some(codes::SYNTAX),
        },
        Stress {
            name: "100k nested slice bounds",
            source: in_metric(&format!("{}x", "x[:".repeat(N))),
            expect: Some(codes::TOO_DEEP),
        },
        Stress {
            name: "100k else-if chain",
            source: in_metric(&format!("{}1", "if c then 1 else ".repeat(N))),
            expect: Some(codes::TOO_DEEP),
        },
        Stress {
            name: "100k unclosed calls and brackets",
            source: in_metric(&"f(x[(".repeat(N / 3)),
            expect: Some(codes::TOO_DEEP),
        },
        Stress {
            name: "100k lets",
            source: format!("metric m {{\n{}    a\n}}\n", "    let a = 1;\n".repeat(N)),
            expect: None,
        },
        Stress {
            name: "100k broken lets",
            source: format!("metric m {{\n{}    a\n}}\n", "    let a = ;\n".repeat(N)),
            expect: Some(codes::SYNTAX),
        },
        Stress { name: "100k lines of garbage", source: "metric 1\n".repeat(N), expect: Some(codes::SYNTAX) },
        Stress { name: "1 MB identifier", source: in_metric(&"x".repeat(1 << 20)), expect: None },
        Stress { name: "100k-digit integer", source: in_metric(&"7".repeat(N)), expect: Some(codes::LITERAL) },
        Stress {
            name: "deepest allowed parens",
            source: in_metric(&format!("{}x{}", "(".repeat(deep), ")".repeat(deep))),
            expect: None,
        },
        Stress { name: "longest allowed chain", source: in_metric(&format!("{}a", "a + ".repeat(deep))), expect: None },
        Stress {
            name: "deepest allowed prefix",
            source: in_metric(&format!("{}x", "!-".repeat(deep / 2))),
            expect: None,
        },
        Stress {
            name: "deepest allowed calls",
            source: in_metric(&format!("{}x{}", "f(".repeat(deep), ")".repeat(deep))),
            expect: None,
        },
    ]
}

#[test]
fn stress_inputs_neither_panic_nor_overflow() {
    for stress in stress_inputs() {
        let result = check(stress.name, stress.source.as_bytes());
        match (stress.expect, &result) {
            (None, Ok(file)) => {
                // The formatter and the dump walk the tree recursively; at the depth limit
                // they must fit in this test thread's stack too.
                assert!(!dump_file(file).is_empty());
            }
            (Some(code), Err(diagnostics)) => {
                assert!(
                    diagnostics.iter().any(|diagnostic| diagnostic.code == code),
                    "{}: expected {code}, got {:?}",
                    stress.name,
                    diagnostics.iter().map(|diagnostic| (diagnostic.code, &diagnostic.message)).collect::<Vec<_>>()
                );
                assert!(diagnostics.len() <= grammar::parser::MAX_ERRORS + 1, "{}: unbounded errors", stress.name);
            }
            (expect, result) => panic!(
                "{}: expected {expect:?}, got {:?}",
                stress.name,
                result.as_ref().map(|_| "Ok").map_err(|diagnostics| diagnostics
                    .iter()
                    .map(|diagnostic| diagnostic.message.clone())
                    .collect::<Vec<_>>())
            ),
        }
    }
}

/// A small deterministic pseudo-random generator (xorshift64*), so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.below(choices.len())]
    }
}

const FRAGMENTS: &[&str] = &[
    "metric ",
    "loss ",
    "use ",
    "let ",
    "if ",
    " then ",
    " else ",
    "with ",
    "true",
    "false",
    "m",
    "P",
    "L",
    "V",
    "count",
    "mean",
    "x",
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    ":",
    ";",
    ",",
    "=",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "&",
    "|",
    "^",
    "!",
    "@",
    ".",
    "0",
    "1",
    "2.5",
    "1e-8",
    "1e999",
    "99999999999999999999",
    " ",
    "\n",
    "\t",
    "\r\n",
    "#",
    "## doc\n",
    "\"a.metric\"",
    "\"",
    "é",
    "π",
    "\u{0}",
    "\u{feff}",
];

#[test]
fn random_inputs_never_panic() {
    let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
    for case in 0..1000 {
        let length = random.below(200);
        let mut bytes = Vec::new();
        if case % 2 == 0 {
            // Half the cases start like a real definition, to get past the top level.
            bytes.extend_from_slice(b"metric m { ");
        }
        for _ in 0..length {
            if random.below(8) == 0 {
                bytes.push((random.next() >> 24) as u8);
            } else {
                bytes.extend_from_slice(random.pick(FRAGMENTS).as_bytes());
            }
        }
        // Either outcome is fine; `check` verifies the round trip or the rendering.
        let _ = check(&format!("random case {case}: {:?}", String::from_utf8_lossy(&bytes)), &bytes);
    }
}

/// Random well-formed source text, built from the grammar.
struct Generator {
    random: XorShift,
}

impl Generator {
    fn expression(&mut self, depth: usize) -> String {
        let leaf = depth == 0 || self.random.below(4) == 0;
        if leaf {
            return match self.random.below(6) {
                0 => self.random.below(100).to_string(),
                1 => self.random.pick(&["0.5", "1e-8", "2.5e3", "1.0", "0.1"]).to_string(),
                2 => self.random.pick(&["true", "false"]).to_string(),
                _ => self.random.pick(&["P", "L", "V", "x", "tol", "int", "fn"]).to_string(),
            };
        }
        let inner = depth - 1;
        match self.random.below(9) {
            0..=2 => {
                let op = self.random.pick(&["+", "-", "*", "/", "&", "|", "^", "<", "<=", ">", ">=", "==", "!="]);
                let lhs = self.expression(inner);
                let rhs = self.expression(inner);
                // Comparisons do not chain, so a comparison is parenthesised as a whole
                // (it may end up as an operand of another comparison) and so are its
                // operands (which may be comparisons themselves).
                let comparison = ["<", "<=", ">", ">=", "==", "!="].contains(&op);
                if comparison {
                    format!("(({lhs}) {op} ({rhs}))")
                } else {
                    format!("{lhs} {op} {rhs}")
                }
            }
            3 => format!("{}{}", self.random.pick(&["-", "!"]), self.expression(inner)),
            4 => format!("({})", self.expression(inner)),
            5 => {
                let start = if self.random.below(2) == 0 { self.expression(inner) } else { String::new() };
                let end = if self.random.below(2) == 0 { self.expression(inner) } else { String::new() };
                format!("({})[{start}:{end}]", self.expression(inner))
            }
            6 => format!("({})@{}", self.expression(inner), self.random.pick(&["tp", "none", "a"])),
            7 => {
                format!("if {} then {} else {}", self.expression(inner), self.expression(inner), self.expression(inner))
            }
            _ => {
                let count = self.random.below(4);
                let args: Vec<String> = (0..count)
                    .map(|_| {
                        let value = self.expression(inner);
                        if self.random.below(3) == 0 {
                            format!("{}: {value}", self.random.pick(&["where", "tol", "k"]))
                        } else {
                            value
                        }
                    })
                    .collect();
                format!("{}({})", self.random.pick(&["count", "mean", "f"]), args.join(", "))
            }
        }
    }

    fn file(&mut self) -> String {
        let mut text = String::new();
        if self.random.below(2) == 0 {
            text.push_str("use \"other.metric\";\n");
        }
        for index in 0..1 + self.random.below(3) {
            if self.random.below(2) == 0 {
                text.push_str("## Documentation.\n##\n##  Indented.\n");
            }
            let keyword = self.random.pick(&["metric", "loss"]);
            text.push_str(&format!("{keyword} d{index}"));
            if self.random.below(2) == 0 {
                text.push_str("(a: int = -3, b: float = 0.25, c: bool = false,)");
            }
            if self.random.below(3) == 0 {
                text.push_str(" with pieces = 1, scale = -2.5e-3");
            }
            text.push_str(" {\n");
            for binding in 0..self.random.below(3) {
                text.push_str(&format!("  let v{binding} = {}; # comment\n", self.expression(3)));
            }
            text.push_str(&format!("  {}\n}}\n", self.expression(4)));
        }
        text
    }
}

#[test]
fn random_well_formed_files_round_trip_through_the_formatter() {
    let mut generator = Generator { random: XorShift(0xD1B5_4A32_D192_ED03) };
    for case in 0..300 {
        let source = generator.file();
        let file = match parse(&source) {
            Ok(file) => file,
            Err(diagnostics) => panic!(
                "generated case {case} does not parse:\n{source}\n{}",
                render(&diagnostics, "generated.metric", &source, false)
            ),
        };
        common::check_spans(&source, &file);
        check_round_trip(&format!("generated case {case}:\n{source}"), &file);
    }
}
