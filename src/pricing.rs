//! Model prices and the cost of a [`Usage`], in integer micro-dollars. It owns
//! the rounding rule (always up: the supervisor may over-charge by less than one
//! micro-dollar per answer, never under-charge) and must not know where prices
//! come from (fleet.yaml) or where costs go (budget, ledger).
//!
//! Prices are held as integer micro-USD per million tokens, so $3.75/Mtok is
//! `3_750_000` and a cost is `ceil(Σ tokens × price / 10⁶)` micro-USD, computed
//! exactly in 128-bit integers: no float rounding can drift a monthly total.

use crate::proxy::usage::Usage;

/// Prices of one model, in micro-USD per million tokens (= USD per token × 10¹²).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    /// Writing into the prompt cache (Anthropic `cache_creation_input_tokens`).
    pub cache_write: u64,
    /// Reading from the prompt cache (Anthropic `cache_read_input_tokens`,
    /// OpenAI `cached_tokens`).
    pub cache_read: u64,
}

/// A price that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "price `{field}` is {value}: give a finite, non-negative number of USD per million tokens, e.g. `3.75`"
)]
pub struct InvalidPrice {
    pub field: &'static str,
    pub value: f64,
}

impl Prices {
    /// From USD per million tokens, as written in fleet.yaml (`input: 3`,
    /// `cache_read: 0.3`). Prices resolve to a millionth of a dollar per
    /// million tokens; a value within float noise of such a step takes that
    /// step, anything finer rounds up.
    pub fn from_usd_per_mtok(
        input: f64,
        output: f64,
        cache_write: f64,
        cache_read: f64,
    ) -> Result<Self, InvalidPrice> {
        Ok(Self {
            input: to_micro("input", input)?,
            output: to_micro("output", output)?,
            cache_write: to_micro("cache_write", cache_write)?,
            cache_read: to_micro("cache_read", cache_read)?,
        })
    }

    /// The highest price an input token can be billed at: what a reservation
    /// must assume before it knows how the input will hit the cache.
    pub fn max_input(&self) -> u64 {
        self.input.max(self.cache_write).max(self.cache_read)
    }
}

fn to_micro(field: &'static str, usd: f64) -> Result<u64, InvalidPrice> {
    let scaled = usd * 1e6;
    // Refuses NaN, infinities, negatives and absurd values, so the cast below
    // stays in range.
    if !(0.0..9.2e18).contains(&scaled) {
        return Err(InvalidPrice { field, value: usd });
    }
    let nearest = scaled.round();
    // Decimal prices like 0.3 are not exact in binary; their product with 10⁶
    // lands a few ulps from the integer they mean.
    let micro = if (scaled - nearest).abs() <= nearest.max(1.0) * 4.0 * f64::EPSILON {
        nearest
    } else {
        scaled.ceil()
    };
    // In range and integral by the checks above.
    Ok(micro as u64)
}

/// Cost of `usage` at `prices` in micro-USD, rounded up.
pub fn cost_micro_usd(usage: &Usage, prices: &Prices) -> u64 {
    let terms = [
        (usage.input_tokens, prices.input),
        (usage.output_tokens, prices.output),
        (usage.cache_creation_input_tokens, prices.cache_write),
        (usage.cache_read_input_tokens, prices.cache_read),
    ];
    let pico = terms.iter().fold(0u128, |sum, &(tokens, price)| {
        sum.saturating_add(u128::from(tokens) * u128::from(price))
    });
    u64::try_from(pico.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Worst-case cost of a request before it is sent: every input token at the
/// dearest input price, and all of `max_output_tokens` produced.
pub fn worst_case_cost_micro_usd(
    input_tokens_upper_bound: u64,
    max_output_tokens: u64,
    prices: &Prices,
) -> u64 {
    let pico = (u128::from(input_tokens_upper_bound) * u128::from(prices.max_input()))
        .saturating_add(u128::from(max_output_tokens) * u128::from(prices.output));
    u64::try_from(pico.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sonnet() -> Prices {
        // claude-sonnet-4-5: $3 in, $15 out, $3.75 cache write, $0.30 cache read.
        Prices::from_usd_per_mtok(3.0, 15.0, 3.75, 0.3).unwrap_or_default()
    }

    fn usage(input: u64, output: u64, cache_write: u64, cache_read: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: cache_write,
            cache_read_input_tokens: cache_read,
        }
    }

    #[test]
    fn prices_convert_exactly_from_decimal_usd() {
        assert_eq!(
            sonnet(),
            Prices {
                input: 3_000_000,
                output: 15_000_000,
                cache_write: 3_750_000,
                cache_read: 300_000
            }
        );
        let cases = [
            (0.0, 0),
            (0.1, 100_000),
            (0.15, 150_000),
            (0.075, 75_000),
            (1.1, 1_100_000),
            (0.000001, 1),
            // Finer than a millionth: rounds up, never down.
            (0.0000001, 1),
            (2.0000004, 2_000_001),
        ];
        for (usd, want) in cases {
            assert_eq!(to_micro("input", usd), Ok(want), "{usd}");
        }
    }

    #[test]
    fn invalid_prices_are_refused_with_the_field_named() {
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e20] {
            let err = Prices::from_usd_per_mtok(1.0, 1.0, 1.0, bad);
            assert_eq!(err.map_err(|e| e.field), Err("cache_read"), "{bad}");
        }
        let msg = Prices::from_usd_per_mtok(-2.0, 1.0, 1.0, 1.0).map_err(|e| e.to_string());
        assert_eq!(
            msg,
            Err("price `input` is -2: give a finite, non-negative number of USD per million tokens, e.g. `3.75`".to_owned())
        );
    }

    #[test]
    fn cost_rounds_up_and_only_up() {
        let p = sonnet();
        let cases = [
            (usage(0, 0, 0, 0), 0),
            // 1 input token at $3/Mtok = 3 micro-USD exactly.
            (usage(1, 0, 0, 0), 3),
            // 1 cache read at $0.30/Mtok = 0.3 micro-USD: rounds up to 1.
            (usage(0, 0, 0, 1), 1),
            // 10 cache reads = 3 micro-USD exactly: no spurious extra unit.
            (usage(0, 0, 0, 10), 3),
            // 11 cache reads = 3.3 -> 4.
            (usage(0, 0, 0, 11), 4),
            // Parts are summed before rounding: 0.3 + 3.75 = 4.05 -> 5.
            (usage(0, 0, 1, 1), 5),
            // A realistic answer: 472 in, 89 out, 1200 written, 3000 read:
            // 1416 + 1335 + 4500 + 900 = 8151 micro-USD.
            (usage(472, 89, 1200, 3000), 8151),
            // One million output tokens cost exactly the output price.
            (usage(0, 1_000_000, 0, 0), 15_000_000),
        ];
        for (u, want) in cases {
            assert_eq!(cost_micro_usd(&u, &p), want, "{u:?}");
        }
        // Never below the exact rational cost, never a full unit above it.
        for tokens in 0..2_000u64 {
            let u = usage(tokens, tokens / 3, tokens / 7, tokens * 5);
            let exact_pico = u128::from(u.input_tokens) * 3_000_000
                + u128::from(u.output_tokens) * 15_000_000
                + u128::from(u.cache_creation_input_tokens) * 3_750_000
                + u128::from(u.cache_read_input_tokens) * 300_000;
            let got = u128::from(cost_micro_usd(&u, &p)) * 1_000_000;
            assert!(got >= exact_pico && got < exact_pico + 1_000_000, "{u:?}");
        }
    }

    #[test]
    fn cost_saturates_instead_of_overflowing() {
        let u = usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        let p = Prices {
            input: u64::MAX,
            output: u64::MAX,
            cache_write: u64::MAX,
            cache_read: u64::MAX,
        };
        assert_eq!(cost_micro_usd(&u, &p), u64::MAX);
        assert_eq!(worst_case_cost_micro_usd(u64::MAX, u64::MAX, &p), u64::MAX);
    }

    #[test]
    fn worst_case_prices_input_at_the_dearest_input_rate() {
        let p = sonnet();
        // 1000 input tokens at the cache-write price ($3.75) + 100 output at $15.
        assert_eq!(worst_case_cost_micro_usd(1000, 100, &p), 3750 + 1500);
        // The worst case is never below any way the same tokens can be billed.
        for (i, c, r) in [(1000, 0, 0), (0, 1000, 0), (0, 0, 1000), (300, 300, 400)] {
            let real = cost_micro_usd(&usage(i, 100, c, r), &p);
            assert!(worst_case_cost_micro_usd(1000, 100, &p) >= real);
        }
    }
}
