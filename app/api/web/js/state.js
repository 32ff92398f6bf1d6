// The page's shared state: one object every module reads and writes, so a newcomer finds it here.

export const state = {
  key: "",
  role: null,            // the key's role from /api/v1/keys/me: instrument < scientist < admin
  tab: "segment",
  reporters: [],
  cellLines: [],
  aliases: [],
  jobs: [],              // the page of jobs on screen
  jobsTotal: 0,
  jobsOffset: 0,
  selectedJobId: null,
  versions: [],
  datasets: [],
  blobUrls: new Map(),   // result url + sha256 -> object URL (fetched once, with the key)
};

const RANK = {instrument: 1, scientist: 2, admin: 3};

/** Whether the key may do what needs `role` (unknown role: let the server decide). */
export function mayDo(role) {
  return state.role === null || (RANK[state.role] || 0) >= RANK[role];
}

/** Forget everything fetched with a key (the key was forgotten or changed). */
export function resetData() {
  for (const url of state.blobUrls.values()) URL.revokeObjectURL(url);
  state.blobUrls.clear();
  Object.assign(state, {role: null, reporters: [], cellLines: [], aliases: [], jobs: [], jobsTotal: 0,
    jobsOffset: 0, selectedJobId: null, versions: [], datasets: []});
}
