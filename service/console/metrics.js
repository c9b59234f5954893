// Prometheus text exposition: parse samples, and estimate a quantile from a histogram.

/** [{name, labels, value}] of every sample line. */
export function parseMetrics(text) {
  const samples = [];
  for (const line of String(text).split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

const matches = (labels, want) => Object.entries(want).every(([k, v]) => labels[k] === v);

/** Sum of the samples named `name` whose labels include `want`. */
export function total(samples, name, want = {}) {
  return samples.filter((s) => s.name === name && matches(s.labels, want)).reduce((a, s) => a + s.value, 0);
}

/**
 * The q-quantile of histogram `base` (its `_bucket` series summed over label sets matching `want`),
 * interpolated linearly inside the bucket as Prometheus' histogram_quantile does; null when empty.
 */
export function histogramQuantile(samples, base, q, want = {}) {
  const byLe = new Map();
  for (const s of samples) {
    if (s.name !== `${base}_bucket` || !matches(s.labels, want)) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  const buckets = [...byLe.entries()].sort((a, b) => a[0] - b[0]);
  if (!buckets.length) return null;
  const count = buckets[buckets.length - 1][1];
  if (!count) return null;
  const rank = q * count;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, cum] of buckets) {
    if (cum >= rank) {
      if (le === Infinity) return prevLe;
      return prevLe + ((le - prevLe) * (rank - prevCount)) / Math.max(cum - prevCount, 1e-12);
    }
    prevLe = le;
    prevCount = cum;
  }
  return prevLe;
}
