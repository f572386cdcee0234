//! Key names for senders of [`crate::input::InputRequest::Key`] (`isolactl key`, `type`):
//! names as in Linux's `KEY_*` constants, lower case, plus a few common aliases, and the US
//! layout for typing text.

/// Linux evdev codes of the keys of a PC keyboard, by name.
#[rustfmt::skip]
const KEYS: &[(&str, u16)] = &[
    ("esc", 1), ("escape", 1),
    ("1", 2), ("2", 3), ("3", 4), ("4", 5), ("5", 6), ("6", 7), ("7", 8), ("8", 9), ("9", 10),
    ("0", 11), ("minus", 12), ("equal", 13), ("backspace", 14), ("tab", 15),
    ("q", 16), ("w", 17), ("e", 18), ("r", 19), ("t", 20), ("y", 21), ("u", 22), ("i", 23),
    ("o", 24), ("p", 25), ("leftbrace", 26), ("rightbrace", 27), ("enter", 28), ("return", 28),
    ("leftctrl", 29), ("ctrl", 29),
    ("a", 30), ("s", 31), ("d", 32), ("f", 33), ("g", 34), ("h", 35), ("j", 36), ("k", 37),
    ("l", 38), ("semicolon", 39), ("apostrophe", 40), ("grave", 41),
    ("leftshift", 42), ("shift", 42), ("backslash", 43),
    ("z", 44), ("x", 45), ("c", 46), ("v", 47), ("b", 48), ("n", 49), ("m", 50),
    ("comma", 51), ("dot", 52), ("slash", 53), ("rightshift", 54), ("kpasterisk", 55),
    ("leftalt", 56), ("alt", 56), ("space", 57), ("capslock", 58),
    ("f1", 59), ("f2", 60), ("f3", 61), ("f4", 62), ("f5", 63), ("f6", 64), ("f7", 65),
    ("f8", 66), ("f9", 67), ("f10", 68), ("numlock", 69), ("scrolllock", 70),
    ("kp7", 71), ("kp8", 72), ("kp9", 73), ("kpminus", 74), ("kp4", 75), ("kp5", 76),
    ("kp6", 77), ("kpplus", 78), ("kp1", 79), ("kp2", 80), ("kp3", 81), ("kp0", 82),
    ("kpdot", 83), ("102nd", 86), ("f11", 87), ("f12", 88), ("kpenter", 96),
    ("rightctrl", 97), ("kpslash", 98), ("sysrq", 99), ("rightalt", 100), ("altgr", 100),
    ("home", 102), ("up", 103), ("pageup", 104), ("left", 105), ("right", 106), ("end", 107),
    ("down", 108), ("pagedown", 109), ("insert", 110), ("delete", 111), ("del", 111),
    ("mute", 113), ("volumedown", 114), ("volumeup", 115), ("power", 116), ("pause", 119),
    ("leftmeta", 125), ("meta", 125), ("super", 125), ("rightmeta", 126), ("compose", 127),
    ("menu", 139),
];

/// Every key name, in the table's order (PC keyboard rows), aliases included.
pub fn names() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(name, _)| *name)
}

/// The code of one key: a name from the table (any case) or a number (`30`, `0x1e`).
pub fn key_code(name: &str) -> Result<u16, String> {
    let lower = name.to_ascii_lowercase();
    if let Some(&(_, code)) = KEYS.iter().find(|(n, _)| *n == lower) {
        return Ok(code);
    }
    let number = match lower.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16),
        None if lower.starts_with(|c: char| c.is_ascii_digit()) => lower.parse(),
        None => return Err(format!("unknown key '{name}' (a KEY_* name or a code)")),
    };
    number.map_err(|_| format!("key code '{name}' does not fit 16 bits"))
}

/// The keys of a chord such as `ctrl+alt+delete`, in the order they are pressed.
pub fn chord(text: &str) -> Result<Vec<u16>, String> {
    if text.is_empty() {
        return Err("empty key name".into());
    }
    text.split('+').map(key_code).collect()
}

/// The key and whether shift is needed to type `c` on a US keyboard; `None` for characters
/// it has no key for.
pub fn char_key(c: char) -> Option<(u16, bool)> {
    const SHIFTED: &[(char, char)] = &[
        ('!', '1'),
        ('@', '2'),
        ('#', '3'),
        ('$', '4'),
        ('%', '5'),
        ('^', '6'),
        ('&', '7'),
        ('*', '8'),
        ('(', '9'),
        (')', '0'),
        ('_', '-'),
        ('+', '='),
        ('{', '['),
        ('}', ']'),
        ('|', '\\'),
        (':', ';'),
        ('"', '\''),
        ('~', '`'),
        ('<', ','),
        ('>', '.'),
        ('?', '/'),
    ];
    let plain = |c: char| -> Option<u16> {
        let name = match c {
            'a'..='z' | '0'..='9' => return key_code(c.encode_utf8(&mut [0; 4])).ok(),
            ' ' => "space",
            '\n' => "enter",
            '\t' => "tab",
            '-' => "minus",
            '=' => "equal",
            '[' => "leftbrace",
            ']' => "rightbrace",
            '\\' => "backslash",
            ';' => "semicolon",
            '\'' => "apostrophe",
            '`' => "grave",
            ',' => "comma",
            '.' => "dot",
            '/' => "slash",
            _ => return None,
        };
        key_code(name).ok()
    };
    if c.is_ascii_uppercase() {
        return plain(c.to_ascii_lowercase()).map(|k| (k, true));
    }
    if let Some(&(_, base)) = SHIFTED.iter().find(|(s, _)| *s == c) {
        return plain(base).map(|k| (k, true));
    }
    plain(c).map(|k| (k, false))
}

/// Key events (code, pressed) for a chord: pressed in order unless `release_only`, then
/// released in reverse unless `press_only`.
pub fn chord_events(
    text: &str,
    press_only: bool,
    release_only: bool,
) -> Result<Vec<(u16, bool)>, String> {
    let codes = chord(text)?;
    let mut out = Vec::new();
    if !release_only {
        out.extend(codes.iter().map(|&code| (code, true)));
    }
    if !press_only {
        out.extend(codes.iter().rev().map(|&code| (code, false)));
    }
    Ok(out)
}

/// Key events (code, pressed) that type `text` on a US keyboard, shift held where needed.
pub fn text_events(text: &str) -> Result<Vec<(u16, bool)>, String> {
    const SHIFT: u16 = 42;
    let mut out = Vec::new();
    for c in text.chars() {
        let (code, shift) =
            char_key(c).ok_or_else(|| format!("no key types {c:?} on a US keyboard"))?;
        if shift {
            out.push((SHIFT, true));
        }
        out.extend([(code, true), (code, false)]);
        if shift {
            out.push((SHIFT, false));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_codes_and_chords() {
        assert_eq!(key_code("a"), Ok(30));
        assert_eq!(key_code("ENTER"), Ok(28));
        assert_eq!(key_code("0x1e"), Ok(30));
        assert_eq!(key_code("57"), Ok(57));
        assert!(key_code("nosuchkey").is_err());
        assert!(key_code("70000").is_err());
        assert_eq!(chord("ctrl+alt+delete"), Ok(vec![29, 56, 111]));
        assert!(chord("").is_err());
        assert!(chord("ctrl+").is_err());
    }

    #[test]
    fn us_layout() {
        assert_eq!(char_key('a'), Some((30, false)));
        assert_eq!(char_key('A'), Some((30, true)));
        assert_eq!(char_key('!'), Some((2, true)));
        assert_eq!(char_key('\n'), Some((28, false)));
        assert_eq!(char_key('?'), Some((53, true)));
        assert_eq!(char_key('é'), None);
        assert_eq!(
            text_events("A"),
            Ok(vec![(42, true), (30, true), (30, false), (42, false)])
        );
        assert!(text_events("é").is_err());
        assert_eq!(
            chord_events("ctrl+c", false, false),
            Ok(vec![(29, true), (46, true), (46, false), (29, false)])
        );
        assert_eq!(chord_events("a", true, false), Ok(vec![(30, true)]));
    }
}
