//! Aligned plain-text tables for the CLI (`status`, `usage`, `tune`): the one
//! place that decides column widths and alignment. Pure; knows no columns.

/// Pads every cell to its column's widest (in characters), right-aligning the
/// columns `right` says are numbers, two spaces between columns, no trailing
/// blanks. One string per input line.
pub fn align(lines: &[Vec<String>], right: impl Fn(usize) -> bool) -> Vec<String> {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            lines
                .iter()
                .filter_map(|l| l.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    lines
        .iter()
        .map(|line| {
            let cells: Vec<String> = line
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if right(i) {
                        format!("{cell:>w$}", w = widths[i])
                    } else {
                        format!("{cell:<w$}", w = widths[i])
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_by_character_count() {
        let lines = vec![
            vec!["AGENT".to_owned(), "TOKENS".to_owned(), "NOTE".to_owned()],
            vec!["a".to_owned(), "1,000".to_owned(), "".to_owned()],
            vec!["sparkles".to_owned(), "7".to_owned(), "→ ok".to_owned()],
        ];
        assert_eq!(
            align(&lines, |i| i == 1),
            vec![
                "AGENT     TOKENS  NOTE",
                "a          1,000",
                "sparkles       7  → ok",
            ]
        );
    }
}
