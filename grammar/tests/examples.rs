//! Every example in `examples/` parses, its spans cover exactly their nodes' text, its
//! tree matches the pinned dump, its canonical formatting is pinned, and formatting
//! round-trips: re-parsing the formatted text gives the same tree (up to spans), and
//! formatting is idempotent.
//!
//! Adding an example file adds its checks here; `INSTA_UPDATE=always cargo test -p
//! losscc-grammar` writes its snapshot, to be reviewed before committing.

mod common;

use std::path::{Path, PathBuf};

use grammar::dump::dump_file;
use grammar::format::strip_spans;
use grammar::{format_file, parse, render};

#[path = "../../tests/common/files.rs"]
mod files;

fn example_files() -> Vec<PathBuf> {
    let files = files::metric_files(&files::root_from(env!("CARGO_MANIFEST_DIR")).join("examples"));
    assert!(!files.is_empty(), "no examples found");
    files
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default()
}

fn parse_or_show(name: &str, source: &str) -> grammar::ast::File {
    match parse(source) {
        Ok(file) => file,
        Err(diagnostics) => panic!("{name} does not parse:\n{}", render(&diagnostics, name, source, false)),
    }
}

#[test]
fn examples_parse_to_the_pinned_trees() {
    for path in example_files() {
        let name = stem(&path);
        let source = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let file = parse_or_show(&name, &source);
        common::check_spans(&source, &file);
        insta::assert_snapshot!(format!("ast_{name}"), dump_file(&file));
    }
}

#[test]
fn examples_format_canonically() {
    for path in example_files() {
        let name = stem(&path);
        let source = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let file = parse_or_show(&name, &source);
        insta::assert_snapshot!(format!("formatted_{name}"), format_file(&file));
    }
}

#[test]
fn formatting_examples_round_trips_and_is_idempotent() {
    for path in example_files() {
        let name = stem(&path);
        let source = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let file = parse_or_show(&name, &source);
        let formatted = format_file(&file);
        let reparsed = parse_or_show(&format!("formatted {name}"), &formatted);
        assert_eq!(strip_spans(&reparsed), strip_spans(&file), "{name}: formatting changed the tree");
        assert_eq!(format_file(&reparsed), formatted, "{name}: formatting is not idempotent");
    }
}
