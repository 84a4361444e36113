// Runs queries through @supabase/postgrest-js (the client supabase-js uses) against lakesync's
// /rest/v1 and prints each answer as one JSON line: {name, data, count, error, status}.
// Usage: node postgrest_client.js <base url, e.g. http://127.0.0.1:8080/rest/v1>
const { PostgrestClient } = require('@supabase/postgrest-js');

const client = new PostgrestClient(process.argv[2]);
const crm = new PostgrestClient(process.argv[2], { schema: 'crm' });

const queries = {
  eq_order: () => client.from('orders').select('id').eq('status', 'new').order('id', { ascending: false }),
  in_list: () => client.from('orders').select('id').in('status', ['new', 'Shipped late']).order('id'),
  ilike_gte: () => client.from('orders').select('id').ilike('status', '%shipped%').gte('total', 10).order('total', { ascending: false }).order('id'),
  is_null: () => client.from('orders').select('id').is('note', null).order('id'),
  not_null: () => client.from('orders').select('id').not('note', 'is', null).lt('id', 6).order('id'),
  or_nested: () => client.from('orders').select('id').or('status.eq.cancelled,and(id.gt.15,total.lt.12)').order('id'),
  range_count: () => client.from('orders').select('id', { count: 'exact' }).order('id').range(2, 5),
  head_count: () => client.from('orders').select('*', { count: 'exact', head: true }).eq('status', 'new'),
  single: () => client.from('orders').select('order_id:id,status').eq('id', 2).single(),
  single_many: () => client.from('orders').select('id').eq('status', 'new').single(),
  maybe_none: () => client.from('orders').select('id').eq('id', 999).maybeSingle(),
  csv: () => client.from('orders').select('id,note').in('id', [4, 5]).order('id').csv(),
  unknown_column: () => client.from('orders').select('id').eq('nope', 1),
  bad_value: () => client.from('orders').select('id').eq('id', 'abc'),
  other_schema: () => crm.from('orders').select('*'),
  insert: () => client.from('orders').insert({ id: 100, status: 'x' }),
  update: () => client.from('orders').update({ status: 'x' }).eq('id', 1),
  delete: () => client.from('orders').delete().eq('id', 1),
};

(async () => {
  for (const [name, run] of Object.entries(queries)) {
    const { data, count, error, status } = await run();
    console.log(JSON.stringify({ name, data, count, error, status }));
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
