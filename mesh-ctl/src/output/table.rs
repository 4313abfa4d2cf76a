//! Aligned text tables that fit a terminal's width. Columns shrink, widest first, down to what
//! their header needs; a cell that no longer fits is cut in the middle (names and identities
//! keep both ends, which is where they differ) or wrapped onto more lines (lists, prose).
//! A cell may hold several lines of its own; the row is as tall as its tallest cell.

const GAP: &str = "  ";
const ELLIPSIS: char = '…';
/// A shrinkable column never gets narrower than this (or its header, if wider).
const MIN_WIDTH: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Never narrower than its content: short fixed things (numbers, yes/no).
    Keep,
    /// Cut in the middle with `…`.
    Cut,
    /// Broken onto more lines, at spaces, commas or slashes where possible.
    Wrap,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub header: &'static str,
    pub overflow: Overflow,
    /// Right-aligned (numbers).
    pub right: bool,
}

impl Column {
    pub const fn new(header: &'static str, overflow: Overflow) -> Self {
        Column {
            header,
            overflow,
            right: false,
        }
    }

    pub const fn number(header: &'static str) -> Self {
        Column {
            header,
            overflow: Overflow::Keep,
            right: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

fn width(s: &str) -> usize {
    s.chars().count()
}

impl Table {
    pub fn new(columns: Vec<Column>) -> Self {
        Table {
            columns,
            rows: Vec::new(),
        }
    }

    /// One row; a cell with `\n` spans several lines.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The column widths that fit `max` (when the content allows it).
    fn widths(&self, max: usize) -> Vec<usize> {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.rows
                    .iter()
                    .flat_map(|r| r[i].lines())
                    .map(width)
                    .chain([width(c.header)])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let floor: Vec<usize> = self
            .columns
            .iter()
            .zip(&widths)
            .map(|(c, &w)| match c.overflow {
                Overflow::Keep => w,
                Overflow::Cut | Overflow::Wrap => w.min(MIN_WIDTH.max(width(c.header))),
            })
            .collect();
        let total = |w: &[usize]| w.iter().sum::<usize>() + GAP.len() * w.len().saturating_sub(1);
        while total(&widths) > max {
            let widest = (0..widths.len())
                .filter(|&i| widths[i] > floor[i])
                .max_by_key(|&i| (widths[i], std::cmp::Reverse(i)));
            match widest {
                Some(i) => widths[i] -= 1,
                None => break,
            }
        }
        widths
    }

    /// The table in at most `max` columns (wider only when even the narrowest layout is).
    pub fn render(&self, max: usize) -> String {
        let widths = self.widths(max);
        let mut out = String::new();
        let header: Vec<String> = self.columns.iter().map(|c| c.header.to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let cells: Vec<Vec<String>> = row
                .iter()
                .zip(&self.columns)
                .zip(&widths)
                .map(|((cell, column), &w)| fit(cell, column.overflow, w))
                .collect();
            let height = cells.iter().map(Vec::len).max().unwrap_or(1).max(1);
            for line in 0..height {
                let mut text = String::new();
                for (i, ((cell, column), &w)) in cells.iter().zip(&self.columns).zip(&widths).enumerate() {
                    if i > 0 {
                        text.push_str(GAP);
                    }
                    let part = cell.get(line).map(String::as_str).unwrap_or("");
                    let pad = w.saturating_sub(width(part));
                    if column.right {
                        text.extend(std::iter::repeat_n(' ', pad));
                        text.push_str(part);
                    } else {
                        text.push_str(part);
                        text.extend(std::iter::repeat_n(' ', pad));
                    }
                }
                out.push_str(text.trim_end());
                out.push('\n');
            }
        }
        out
    }
}

/// A cell's lines at width `w`.
fn fit(cell: &str, overflow: Overflow, w: usize) -> Vec<String> {
    cell.lines()
        .flat_map(|line| match overflow {
            _ if width(line) <= w => vec![line.to_owned()],
            Overflow::Keep => vec![line.to_owned()],
            Overflow::Cut => vec![cut_middle(line, w)],
            Overflow::Wrap => wrap(line, w),
        })
        .collect()
}

/// `line` in `w` characters, its middle replaced by `…`.
pub fn cut_middle(line: &str, w: usize) -> String {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= w {
        return line.to_owned();
    }
    if w == 0 {
        return String::new();
    }
    let keep = w - 1;
    // The end usually tells more (a pod's hash suffix, an identity's account): it gets the
    // extra character.
    let head = keep / 2;
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push(ELLIPSIS);
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// `line` broken into lines of at most `w` characters, after a space, comma or slash when
/// one is in the second half of the line (so pieces do not get too short), else hard.
pub fn wrap(line: &str, w: usize) -> Vec<String> {
    let w = w.max(1);
    let mut out = Vec::new();
    let mut rest: Vec<char> = line.chars().collect();
    while rest.len() > w {
        let cut = (w / 2..w)
            .rev()
            .find(|&i| matches!(rest[i], ' ' | ',' | '/'))
            .map(|i| i + 1)
            .unwrap_or(w);
        let piece: String = rest[..cut].iter().collect();
        out.push(piece.trim_end().to_owned());
        rest.drain(..cut);
        while rest.first() == Some(&' ') {
            rest.remove(0);
        }
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.into_iter().collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(vec![
            Column::new("NAME", Overflow::Cut),
            Column::number("COUNT"),
            Column::new("NOTE", Overflow::Wrap),
        ]);
        t.row(vec!["web".into(), "7".into(), "ok".into()]);
        t.row(vec![
            "a-much-longer-name".into(),
            "12345".into(),
            "two\nlines".into(),
        ]);
        t
    }

    #[test]
    fn columns_are_aligned_and_numbers_right_aligned() {
        assert_eq!(
            sample().render(80),
            "NAME                COUNT  NOTE\n\
             web                     7  ok\n\
             a-much-longer-name  12345  two\n\
             \x20                          lines\n"
        );
    }

    #[test]
    fn cells_are_cut_in_the_middle_or_wrapped_to_fit() {
        let mut t = Table::new(vec![
            Column::new("ID", Overflow::Cut),
            Column::new("RULES", Overflow::Wrap),
        ]);
        t.row(vec![
            "spiffe://cluster.local/ns/shop/sa/web".into(),
            "from namespaces [shop, ops] to ports [8080]".into(),
        ]);
        let out = t.render(40);
        for line in out.lines() {
            assert!(width(line) <= 40, "{line:?} is wider than 40");
        }
        assert!(out.contains('…'), "{out}");
        assert!(out.contains("sa/web"), "the end of the identity stays: {out}");
        let rules: String = out
            .lines()
            .skip(1)
            .map(|l| l[l.find("  ").unwrap()..].trim())
            .collect();
        assert!(
            rules.contains("[8080]"),
            "nothing of a wrapped cell is lost: {out}"
        );
    }

    #[test]
    fn cut_and_wrap() {
        assert_eq!(cut_middle("abcdefghij", 5), "ab…ij");
        assert_eq!(cut_middle("abc", 5), "abc");
        assert_eq!(
            wrap("10.0.0.1, 10.0.0.2, 10.0.0.3", 12),
            ["10.0.0.1,", "10.0.0.2,", "10.0.0.3"]
        );
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
    }

    #[test]
    fn keep_columns_never_shrink() {
        let mut t = Table::new(vec![Column::number("N"), Column::new("TEXT", Overflow::Cut)]);
        t.row(vec!["123456789".into(), "x".repeat(30)]);
        let out = t.render(20);
        assert!(out.contains("123456789"), "{out}");
        assert!(out.lines().all(|l| width(l) <= 20), "{out}");
    }
}
