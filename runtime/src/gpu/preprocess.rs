//! A very small WGSL preprocessor: `#if NAME`, `#if !NAME`, `#else`, `#endif` on lines of
//! their own, nestable. It exists for what WGSL's `override` constants cannot switch: types
//! (`enable f16;` and f16 storage, vec4 versus scalar array views) and subgroup builtins,
//! which fail validation on a device without the SUBGROUP feature. Everything that is a
//! value (sizes, modes, quant type) is specialized with `override` constants instead.

use crate::error::{Error, Result};

/// The set of names defined for one shader variant, kept sorted so equal sets compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ShaderDefs(Vec<&'static str>);

impl ShaderDefs {
    /// No names defined.
    pub fn none() -> Self {
        ShaderDefs(Vec::new())
    }

    /// Adds `name` when `on`.
    pub fn with(mut self, name: &'static str, on: bool) -> Self {
        if on && !self.0.contains(&name) {
            self.0.push(name);
            self.0.sort_unstable();
        }
        self
    }

    /// Whether `name` is defined.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains(&name)
    }

    /// The defined names.
    pub fn names(&self) -> &[&'static str] {
        &self.0
    }
}

/// Applies the `#if` blocks of `src` for `defs`. Removed lines become empty lines so that
/// naga's error positions still match the file. Names must be upper-case identifiers.
pub fn preprocess(name: &str, src: &str, defs: &ShaderDefs) -> Result<String> {
    // Stack of "this block's condition holds" flags.
    let mut stack: Vec<bool> = Vec::new();
    let mut out = String::with_capacity(src.len());
    let err = |line: usize, what: &str| {
        Error::Internal(format!("shader {name}, line {}: {what}", line + 1))
    };
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#if ") {
            let rest = rest.trim();
            let (neg, flag) = match rest.strip_prefix('!') {
                Some(f) => (true, f.trim()),
                None => (false, rest),
            };
            if flag.is_empty()
                || !flag
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(err(i, &format!("bad #if name {flag:?}")));
            }
            stack.push(defs.has(flag) != neg);
            out.push('\n');
        } else if t == "#else" {
            let top = stack
                .last_mut()
                .ok_or_else(|| err(i, "#else without #if"))?;
            *top = !*top;
            out.push('\n');
        } else if t == "#endif" {
            stack.pop().ok_or_else(|| err(i, "#endif without #if"))?;
            out.push('\n');
        } else if t.starts_with('#') {
            return Err(err(i, &format!("unknown directive {t}")));
        } else {
            if stack.iter().all(|&c| c) {
                out.push_str(line);
            }
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(Error::Internal(format!("shader {name}: unclosed #if")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(src: &str, defs: &ShaderDefs) -> Vec<String> {
        preprocess("t", src, defs)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn selects_blocks() {
        let src = "a\n#if F16\nb\n#if !SUBGROUP\nc\n#endif\n#else\nd\n#endif\ne";
        let on = ShaderDefs::none().with("F16", true);
        assert_eq!(kept(src, &on), ["a", "b", "c", "e"]);
        let both = on.clone().with("SUBGROUP", true);
        assert_eq!(kept(src, &both), ["a", "b", "e"]);
        assert_eq!(kept(src, &ShaderDefs::none()), ["a", "d", "e"]);
        // Removed lines keep their place, so line numbers in errors stay right.
        assert_eq!(preprocess("t", src, &on).unwrap().lines().count(), 10);
    }

    #[test]
    fn rejects_malformed() {
        let none = ShaderDefs::none();
        assert!(preprocess("t", "#if\n#endif", &none).is_err());
        assert!(preprocess("t", "#if F16\n", &none).is_err());
        assert!(preprocess("t", "#endif\n", &none).is_err());
        assert!(preprocess("t", "#else\n", &none).is_err());
        assert!(preprocess("t", "#define X\n", &none).is_err());
    }

    #[test]
    fn defs_are_a_set() {
        let a = ShaderDefs::none()
            .with("B", true)
            .with("A", true)
            .with("A", true);
        let b = ShaderDefs::none()
            .with("A", true)
            .with("B", true)
            .with("C", false);
        assert_eq!(a, b);
        assert_eq!(a.names(), ["A", "B"]);
    }
}
