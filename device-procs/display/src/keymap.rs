//! X keysyms (what VNC KeyEvents carry) to Linux evdev key codes (what `isola-input` sends
//! the guest), for a US keyboard layout.
//!
//! A keysym names a symbol, an evdev code a physical key: VNC clients send Shift as its own
//! key, so `A` and `a` (and `!` and `1`) map to the same key, and the guest's own layout
//! turns key plus Shift back into the symbol.

/// The evdev code of the key that produces `keysym`, if the US layout has one.
pub fn evdev_code(keysym: u32) -> Option<u16> {
    const LETTERS: [u16; 26] = [
        30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17,
        45, 21, 44,
    ];
    let code = match keysym {
        0x61..=0x7a => LETTERS[(keysym - 0x61) as usize],
        0x41..=0x5a => LETTERS[(keysym - 0x41) as usize],
        0x31..=0x39 => (keysym - 0x31 + 2) as u16, // 1..9 -> KEY_1..KEY_9
        0x30 => 11,
        0x20 => 57, // space
        // Shifted digits.
        0x21 => 2,
        0x40 => 3,
        0x23 => 4,
        0x24 => 5,
        0x25 => 6,
        0x5e => 7,
        0x26 => 8,
        0x2a => 9,
        0x28 => 10,
        0x29 => 11,
        // Punctuation, plain and shifted.
        0x2d | 0x5f => 12,
        0x3d | 0x2b => 13,
        0x5b | 0x7b => 26,
        0x5d | 0x7d => 27,
        0x3b | 0x3a => 39,
        0x27 | 0x22 => 40,
        0x60 | 0x7e => 41,
        0x5c | 0x7c => 43,
        0x2c | 0x3c => 51,
        0x2e | 0x3e => 52,
        0x2f | 0x3f => 53,
        // TTY functions and motion.
        0xff08 => 14,  // BackSpace
        0xff09 => 15,  // Tab
        0xfe20 => 15,  // ISO_Left_Tab (Shift+Tab)
        0xff0d => 28,  // Return
        0xff13 => 119, // Pause
        0xff14 => 70,  // Scroll_Lock
        0xff1b => 1,   // Escape
        0xffff => 111, // Delete
        0xff50 => 102, // Home
        0xff51 => 105, // Left
        0xff52 => 103, // Up
        0xff53 => 106, // Right
        0xff54 => 108, // Down
        0xff55 => 104, // Page_Up
        0xff56 => 109, // Page_Down
        0xff57 => 107, // End
        0xff61 => 99,  // Print
        0xff63 => 110, // Insert
        0xff67 => 127, // Menu (KEY_COMPOSE)
        0xff7f => 69,  // Num_Lock
        // Function keys F1..F12.
        0xffbe..=0xffc7 => (keysym - 0xffbe + 59) as u16,
        0xffc8 => 87,
        0xffc9 => 88,
        // Modifiers.
        0xffe1 => 42,  // Shift_L
        0xffe2 => 54,  // Shift_R
        0xffe3 => 29,  // Control_L
        0xffe4 => 97,  // Control_R
        0xffe5 => 58,  // Caps_Lock
        0xffe7 => 125, // Meta_L
        0xffe8 => 126, // Meta_R
        0xffe9 => 56,  // Alt_L
        0xffea => 100, // Alt_R
        0xfe03 => 100, // ISO_Level3_Shift (AltGr)
        0xffeb => 125, // Super_L
        0xffec => 126, // Super_R
        // Keypad.
        0xff8d => 96,          // KP_Enter
        0xffaa => 55,          // KP_Multiply
        0xffab => 78,          // KP_Add
        0xffad => 74,          // KP_Subtract
        0xffae | 0xff9f => 83, // KP_Decimal, KP_Delete
        0xffaf => 98,          // KP_Divide
        0xffb0 | 0xff9e => 82, // KP_0, KP_Insert
        0xffb1 | 0xff9c => 79, // KP_1, KP_End
        0xffb2 | 0xff99 => 80, // KP_2, KP_Down
        0xffb3 | 0xff9b => 81, // KP_3, KP_Page_Down
        0xffb4 | 0xff96 => 75, // KP_4, KP_Left
        0xffb5 | 0xff9d => 76, // KP_5, KP_Begin
        0xffb6 | 0xff98 => 77, // KP_6, KP_Right
        0xffb7 | 0xff95 => 71, // KP_7, KP_Home
        0xffb8 | 0xff97 => 72, // KP_8, KP_Up
        0xffb9 | 0xff9a => 73, // KP_9, KP_Page_Up
        _ => return None,
    };
    Some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_keys() {
        assert_eq!(evdev_code(u32::from(b'a')), Some(30)); // KEY_A
        assert_eq!(evdev_code(u32::from(b'A')), Some(30));
        assert_eq!(evdev_code(u32::from(b'q')), Some(16)); // KEY_Q
        assert_eq!(evdev_code(u32::from(b'z')), Some(44)); // KEY_Z
        assert_eq!(evdev_code(u32::from(b'm')), Some(50)); // KEY_M
        assert_eq!(evdev_code(u32::from(b'1')), Some(2));
        assert_eq!(evdev_code(u32::from(b'0')), Some(11));
        assert_eq!(evdev_code(u32::from(b'!')), Some(2));
        assert_eq!(evdev_code(0xff0d), Some(28)); // Return -> KEY_ENTER
        assert_eq!(evdev_code(0xffbe), Some(59)); // F1
        assert_eq!(evdev_code(0xffc7), Some(68)); // F10
        assert_eq!(evdev_code(0xffc9), Some(88)); // F12
        assert_eq!(evdev_code(0xffe1), Some(42)); // Shift_L
        assert_eq!(evdev_code(0x1234_5678), None);
    }
}
