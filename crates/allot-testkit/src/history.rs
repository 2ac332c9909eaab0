//! The history a `member-child` pod keeps of what it handed out, one line
//! per event: written by the pod, read back by its scan callback and by the
//! tests that check no value was handed out twice.

use std::fmt;

/// One line of a pod's history.
///
/// ```
/// use allot_testkit::history::Line;
/// let line = Line::Value { value: 130, block: 2, epoch: 1, incarnation: 3 };
/// assert_eq!(line.to_string(), "V 130 2 1 3");
/// assert_eq!("V 130 2 1 3".parse::<Line>(), Ok(line));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `V VALUE BLOCK EPOCH INCARNATION`: a value handed out.
    Value {
        value: u64,
        block: u64,
        epoch: u64,
        incarnation: u64,
    },
    /// `F INCARNATION REASON`: the member found itself fenced (and joins
    /// again, as a restarted pod would).
    Fenced { incarnation: u64, why: String },
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Value {
                value,
                block,
                epoch,
                incarnation,
            } => write!(f, "V {value} {block} {epoch} {incarnation}"),
            // One line, whatever the reason says.
            Line::Fenced { incarnation, why } => {
                write!(f, "F {incarnation} {}", why.replace('\n', " "))
            }
        }
    }
}

impl std::str::FromStr for Line {
    type Err = String;

    fn from_str(line: &str) -> Result<Line, String> {
        let number = |field: Option<&str>| -> Result<u64, String> {
            field
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| format!("bad history line: {line}"))
        };
        let mut fields = line.splitn(5, ' ');
        match fields.next() {
            Some("V") => Ok(Line::Value {
                value: number(fields.next())?,
                block: number(fields.next())?,
                epoch: number(fields.next())?,
                incarnation: number(fields.next())?,
            }),
            Some("F") => {
                let incarnation = number(fields.next())?;
                let why = fields.collect::<Vec<_>>().join(" ");
                Ok(Line::Fenced { incarnation, why })
            }
            _ => Err(format!("bad history line: {line}")),
        }
    }
}
