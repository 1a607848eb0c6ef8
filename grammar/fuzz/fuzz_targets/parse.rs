//! Fuzz target: arbitrary bytes through `parse_bytes`.
//!
//! On success the formatter must round-trip (the re-parsed formatted text equals the tree
//! up to spans, and formatting it again changes nothing) and the dump must not panic. On
//! failure every diagnostic must render, with a `file:line:column` location. Any panic or
//! stack overflow is a bug: the parser promises neither happens on any input.

#![no_main]

use grammar::dump::dump_file;
use grammar::format::strip_spans;
use grammar::parser::parse_bytes;
use grammar::{format_file, parse, render};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_bytes(data) {
        Ok(file) => {
            let formatted = format_file(&file);
            let reparsed = match parse(&formatted) {
                Ok(reparsed) => reparsed,
                Err(diagnostics) => panic!(
                    "formatted text does not parse:\n{formatted}\n{}",
                    render(&diagnostics, "formatted.metric", &formatted, false)
                ),
            };
            assert_eq!(strip_spans(&reparsed), strip_spans(&file), "formatting changed the tree:\n{formatted}");
            assert_eq!(format_file(&reparsed), formatted, "formatting is not idempotent");
            let _ = dump_file(&file);
        }
        Err(diagnostics) => {
            assert!(!diagnostics.is_empty(), "Err without diagnostics");
            let source = String::from_utf8_lossy(data);
            for diagnostic in &diagnostics {
                let text = render(std::slice::from_ref(diagnostic), "fuzz.metric", &source, false);
                assert!(text.contains("--> fuzz.metric:"), "no location in:\n{text}");
            }
        }
    }
});
